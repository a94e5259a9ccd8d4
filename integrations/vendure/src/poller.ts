import { Inject, Injectable, OnApplicationBootstrap, OnApplicationShutdown } from '@nestjs/common';
import {
    Channel, ChannelService, ID, Logger, Payment, PaymentMethod, ProcessContext, RequestContext, RequestContextService,
    TransactionalConnection,
} from '@vendure/core';

import { HANDLER_CODE, loggerCtx } from './handler';
import { readPayment } from './ingress';
import { MPESA_PIPELINE_OPTIONS, MpesaPipelineOptions } from './options';
import { EVENT_OF_STATE, PaymentUpdater } from './payment-updater';
import { apiKeyFor } from './secrets';

/**
 * The fallback for a lost webhook: every `pollIntervalSeconds`, up to `pollBatchSize` mpesa-stk
 * payments left Pending longer than `pollPendingAfterSeconds` are looked up with
 * GET /api/payments/{id} on their channel's ingress, and what the pipeline says is applied as its
 * webhook would be (PaymentUpdater). It runs in each Vendure server process, never in the worker.
 * Several server instances may ask about the same payment: PaymentUpdater's locks make the second
 * application find the payment no longer Pending, so it changes nothing.
 */
@Injectable()
export class PendingPaymentPoller implements OnApplicationBootstrap, OnApplicationShutdown {
    private timer: NodeJS.Timeout | undefined;
    private polling = false;
    private cursor: ID | undefined; // the last payment asked about: rounds go round all the waiting ones

    constructor(
        @Inject(MPESA_PIPELINE_OPTIONS) private options: Required<MpesaPipelineOptions>,
        private processContext: ProcessContext,
        private connection: TransactionalConnection,
        private channelService: ChannelService,
        private requestContextService: RequestContextService,
        private updater: PaymentUpdater,
    ) {}

    onApplicationBootstrap() {
        if (!this.processContext.isServer || this.options.pollIntervalSeconds === 0) {
            return;
        }
        this.timer = setInterval(() => void this.round(), this.options.pollIntervalSeconds * 1000);
    }

    onApplicationShutdown() {
        clearInterval(this.timer);
    }

    /** One round; a round still running when the next is due makes that one skip. */
    async round(): Promise<void> {
        if (this.polling) {
            return;
        }
        this.polling = true;
        try {
            const waiting = await this.waitingPayments();
            let unanswered = 0;
            const contexts = new Map<ID, RequestContext>();
            for (const { payment, channel, method } of waiting) {
                if (!(await this.poll(payment, channel, method, contexts))) {
                    unanswered++;
                }
            }
            if (unanswered) {
                Logger.warn(`the pipeline did not say how ${unanswered} of ${waiting.length} Pending payments ended; asked again later`, loggerCtx);
            }
        } catch (e) {
            Logger.error(`polling Pending payments failed: ${(e as Error).message}`, loggerCtx);
        } finally {
            this.polling = false;
        }
    }

    /** False when the pipeline gave no answer usable now. */
    private async poll(payment: Payment, channel: Channel, method: PaymentMethod, contexts: Map<ID, RequestContext>) {
        const arg = (name: string) => method.handler.args.find(a => a.name === name)?.value;
        const [pipelineChannelId, ingressUrl, apiKey] = [arg('pipelineChannelId'), arg('ingressUrl'), apiKeyFor(channel.code)];
        if (!pipelineChannelId || !ingressUrl || !apiKey || !payment.transactionId) {
            return false; // misconfigured: the handler already refuses new payments and logs why
        }
        const view = await readPayment(ingressUrl, apiKey, pipelineChannelId, payment.transactionId);
        if (!view) {
            return false;
        }
        // Own keys only: a state such as "constructor" from a hostile answer maps to nothing.
        const type = Object.prototype.hasOwnProperty.call(EVENT_OF_STATE, view.state) ? EVENT_OF_STATE[view.state] : undefined;
        if (!type || type === 'payment.pending') {
            return true; // still open (or Requested): asked again in a later round
        }
        let ctx = contexts.get(channel.id);
        if (!ctx) {
            ctx = await this.requestContextService.create({ apiType: 'admin', channelOrToken: channel.token });
            contexts.set(channel.id, ctx);
        }
        try {
            await this.updater.apply(ctx, channel, [method.code], {
                type, polled: true, paymentId: payment.transactionId, amount: view.amount, reason: view.reason, mpesaReceipt: view.mpesaReceipt });
        } catch (e) {
            Logger.error(`applying the pipeline's ${view.state} to payment ${payment.id} failed: ${(e as Error).message}`, loggerCtx);
        }
        return true;
    }

    /** The next batch of payments to ask about, each with its order's own channel and payment method. */
    private async waitingPayments() {
        const methods = (await this.connection.rawConnection.getRepository(PaymentMethod).find({ relations: ['channels'] }))
            .filter(m => m.handler?.code === HANDLER_CODE);
        if (!methods.length) {
            return [];
        }
        const query = this.connection.rawConnection.getRepository(Payment).createQueryBuilder('payment')
            .innerJoinAndSelect('payment.order', 'order')
            .innerJoinAndSelect('order.channels', 'channel')
            .where('payment.state = :state', { state: 'Pending' })
            .andWhere('payment.method IN (:...codes)', { codes: [...new Set(methods.map(m => m.code))] })
            .andWhere('payment.transactionId IS NOT NULL')
            .andWhere('payment.createdAt < :before',
                { before: new Date(Date.now() - this.options.pollPendingAfterSeconds * 1000) })
            .orderBy('payment.id', 'ASC')
            .take(this.options.pollBatchSize);
        if (this.cursor !== undefined) {
            query.andWhere('payment.id > :cursor', { cursor: this.cursor });
        }
        const payments = await query.getMany();
        // A short batch reached the end: the next round starts again from the oldest.
        this.cursor = payments.length < this.options.pollBatchSize ? undefined : payments[payments.length - 1].id;
        const defaultChannel = await this.channelService.getDefaultChannel();
        return payments.flatMap(payment => {
            // Every order is in the default channel too; its own channel is the other one, if any.
            const channel = payment.order.channels.find(c => c.id !== defaultChannel.id) ?? defaultChannel;
            // A method made in another channel is in the default channel too, often with the same
            // code: the one the payment was made with is the one naming its pipeline channel.
            const method = methods.find(m => m.code === payment.method && m.channels.some(c => c.id === channel.id) &&
                m.handler.args.some(a => a.name === 'pipelineChannelId' && a.value === payment.metadata?.pipelineChannelId));
            if (!method) {
                // Its method was removed from the channel or now names another pipeline channel:
                // the poller cannot ask about it, and its webhooks are refused (422).
                Logger.warn(`Pending payment ${payment.id} has no mpesa-stk method of its channel for its pipeline ` +
                    'channel any more: an administrator must settle or cancel it', loggerCtx);
            }
            return method ? [{ payment, channel, method }] : [];
        });
    }
}
