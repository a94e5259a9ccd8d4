import { Controller, Param, Post, Req, Res } from '@nestjs/common';
import {
    Channel,
    Logger,
    OrderService,
    Payment,
    PaymentMethodService,
    RequestContext,
    RequestContextService,
    TransactionalConnection,
} from '@vendure/core';
import type { Request, Response } from 'express';
import { Webhook, WebhookVerificationError } from 'standardwebhooks';

import { HANDLER_CODE, loggerCtx, SETTLED_BY_PIPELINE } from './handler';
import { webhookSecretsFor, webhookSecretVariable } from './secrets';

export const WEBHOOK_ROUTE = 'mpesa-pipeline/webhooks';
const MAX_REASON = 300;

interface StatusEvent {
    type: string;
    data: { paymentId: string; channelId: string; state: string; reason?: string | null;
            mpesaReceipt?: string | null; lateMpesaReceipt?: string | null };
}

/**
 * Receives the pipeline's signed status webhooks at POST /mpesa-pipeline/webhooks/<Vendure channel
 * code>. The URL names the Vendure channel, whose secret (from the environment) must verify the
 * body; the body's pipeline channel must be one that channel's payment methods use. Deliveries are
 * at least once and may race: each payment's webhooks are handled one at a time, and a transition
 * is made only from Pending, so a repeated or concurrent event changes nothing twice.
 */
@Controller(WEBHOOK_ROUTE)
export class MpesaWebhookController {
    constructor(
        private connection: TransactionalConnection,
        private requestContextService: RequestContextService,
        private paymentMethodService: PaymentMethodService,
        private orderService: OrderService,
    ) {}

    @Post(':channelCode')
    async receive(@Param('channelCode') channelCode: string, @Req() req: Request, @Res() res: Response) {
        const channel = await this.connection.rawConnection.getRepository(Channel).findOne({ where: { code: channelCode } });
        if (!channel) {
            return void res.status(404).send('unknown channel');
        }
        const secrets = webhookSecretsFor(channel.code);
        if (!secrets.length) {
            Logger.error(`${webhookSecretVariable(channel.code)} is not set: webhooks refused`, loggerCtx);
            return void res.status(503).send('webhooks are not configured for this channel');
        }
        const event = verify(secrets, req);
        if (!event) {
            return void res.status(400).send('signature does not verify');
        }
        const ctx = await this.requestContextService.create({ apiType: 'admin', channelOrToken: channel.token });
        const methods = (await this.paymentMethodService.findAll(ctx)).items.filter(
            m => m.handler.code === HANDLER_CODE &&
                m.handler.args.some(a => a.name === 'pipelineChannelId' && a.value === event.data.channelId),
        );
        if (!methods.length) {
            // Signed with this channel's secret but for a pipeline channel it does not use.
            return void res.status(422).send('not a pipeline channel of this Vendure channel');
        }
        const found = await serially(event.data.paymentId, () =>
            this.connection.withTransaction(ctx, txCtx =>
                this.apply(txCtx, channel, methods.map(m => m.code), event)));
        return void res.status(found ? 204 : 404).send();
    }

    /** False when no payment of this channel has the pipeline's payment id (yet). */
    private async apply(ctx: RequestContext, channel: Channel, methodCodes: string[], event: StatusEvent) {
        const query = this.connection.getRepository(ctx, Payment).createQueryBuilder('payment')
            .innerJoinAndSelect('payment.order', 'order')
            .innerJoin('order.channels', 'channel', 'channel.id = :channelId', { channelId: channel.id })
            .where('payment.transactionId = :tid', { tid: event.data.paymentId })
            .andWhere('payment.method IN (:...codes)', { codes: methodCodes })
            .orderBy('payment.id', 'ASC');
        if (['postgres', 'mysql', 'mariadb'].includes(this.connection.rawConnection.options.type)) {
            // Several Vendure server instances: the row lock serialises them as `serially` does
            // within one process (SQLite and sql.js have no row locks and one writer anyway).
            query.setLock('pessimistic_write', undefined, ['payment']);
        }
        const payments = await query.getMany();
        if (!payments.length) {
            return false;
        }
        const pending = payments.filter(p => p.state === ('Pending' as string));
        const reason = clean(event.data.reason) ?? event.type;
        switch (event.type) {
            case 'payment.settled':
                await this.settle(ctx, payments, pending, event);
                break;
            case 'payment.cancelled':
            case 'payment.failed':
                for (const p of pending) {
                    await this.decline(ctx, p, reason);
                }
                break;
            case 'payment.review':
                for (const p of payments) {
                    p.metadata = merge(p.metadata, { needsReview: true, reviewReason: reason,
                        lateMpesaReceipt: clean(event.data.lateMpesaReceipt), public: { mpesaStatus: 'Review' } });
                    await this.connection.getRepository(ctx, Payment).save(p, { reload: false });
                }
                Logger.warn(`payment ${payments[0].id} needs an administrator: ${reason}`, loggerCtx);
                break;
            default: // payment.pending and anything newer: nothing to change
        }
        return true;
    }

    private async settle(ctx: RequestContext, payments: Payment[], pending: Payment[], event: StatusEvent) {
        if (payments.some(p => p.state === 'Settled')) {
            return; // already settled: a redelivery or a concurrent duplicate
        }
        const [first, ...duplicates] = pending;
        const receipt = clean(event.data.mpesaReceipt);
        if (!first) {
            // Money moved for a payment Vendure already declined: an administrator must decide
            // (refund, or accept it for the order); nothing here may settle it silently.
            for (const p of payments) {
                p.metadata = merge(p.metadata, { needsReview: true, mpesaReceipt: receipt,
                    reviewReason: 'M-Pesa settled a payment this shop had already declined' });
                await this.connection.getRepository(ctx, Payment).save(p, { reload: false });
            }
            Logger.error(`payment.settled for payment ${payments[0].id}, no longer Pending: flagged for review`, loggerCtx);
            return;
        }
        first.metadata = merge(first.metadata, { [SETTLED_BY_PIPELINE]: true, mpesaReceipt: receipt,
            public: { mpesaStatus: 'Settled', mpesaReceipt: receipt } });
        await this.connection.getRepository(ctx, Payment).save(first, { reload: false });
        const result = await this.orderService.settlePayment(ctx, first.id);
        if (!(result instanceof Payment)) {
            throw new Error(`settling payment ${first.id} failed: ${(result as any).message}`);
        }
        // Two addPaymentToOrder racing on one order share the idempotency key, hence one pipeline
        // payment: only one Vendure payment may carry its money.
        for (const d of duplicates) {
            await this.decline(ctx, d, `the same M-Pesa payment settled payment ${first.id}`);
        }
    }

    private async decline(ctx: RequestContext, payment: Payment, reason: string) {
        payment.errorMessage = reason;
        payment.metadata = merge(payment.metadata, { public: { mpesaStatus: 'Declined', reason } });
        await this.connection.getRepository(ctx, Payment).save(payment, { reload: false });
        const result = await this.orderService.transitionPaymentToState(ctx, payment.id, 'Declined');
        if (!(result instanceof Payment)) {
            throw new Error(`declining payment ${payment.id} failed: ${(result as any).message}`);
        }
    }
}

function verify(secrets: string[], req: Request): StatusEvent | null {
    const body: unknown = req.body;
    if (!Buffer.isBuffer(body)) {
        return null;
    }
    const headers: Record<string, string> = {};
    for (const name of ['webhook-id', 'webhook-timestamp', 'webhook-signature']) {
        const value = req.headers[name];
        if (typeof value !== 'string') return null;
        headers[name] = value;
    }
    for (const secret of secrets) {
        try {
            const event = new Webhook(secret).verify(body, headers) as any;
            const data = event?.data;
            if (typeof event?.type !== 'string' || typeof data?.paymentId !== 'string' || typeof data?.channelId !== 'string') {
                return null;
            }
            return event as StatusEvent;
        } catch (e) {
            if (!(e instanceof WebhookVerificationError)) throw e;
        }
    }
    return null;
}

function clean(text: unknown): string | null {
    return typeof text === 'string'
        ? text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]/g, ' ').slice(0, MAX_REASON)
        : null;
}

function merge(metadata: any, extra: Record<string, any>) {
    const base = metadata ?? {};
    return { ...base, ...extra, public: { ...(base.public ?? {}), ...(extra.public ?? {}) } };
}

const queues = new Map<string, Promise<unknown>>();

/** Runs `work` after every earlier call with the same key has finished (a mutex per payment). */
async function serially<T>(key: string, work: () => Promise<T>): Promise<T> {
    const before = queues.get(key) ?? Promise.resolve();
    const run = before.catch(() => undefined).then(work);
    queues.set(key, run);
    try {
        return await run;
    } finally {
        if (queues.get(key) === run) queues.delete(key);
    }
}
