import { Injectable } from '@nestjs/common';
import { Channel, ChannelService, ID, Logger, OrderService, Payment, RequestContext, TransactionalConnection } from '@vendure/core';

import { loggerCtx, SETTLED_BY_PIPELINE } from './handler';

const MAX_REASON = 300;

/** The pipeline's word on one payment, as a status webhook says it (or the poller read it). */
export interface PipelineStatus {
    type: string; // payment.settled, payment.cancelled, payment.failed, payment.review, payment.pending...
    paymentId: string;
    amount?: unknown; // whole shillings, as the pipeline has the payment (the webhook's data.amount)
    currency?: unknown; // the webhook's data.currency (KES); the ingress's GET has no currency field
    reason?: string | null;
    mpesaReceipt?: string | null;
    lateMpesaReceipt?: string | null;
    occurredAt?: unknown; // the webhook's data.occurredAt; the poller reads the state as it is now
    polled?: boolean; // read by the poller (GET, outside the locks), not sent by the pipeline as a webhook
}

/** The webhook event type of each pipeline payment state: the poller maps what it reads this way. */
export const EVENT_OF_STATE: Readonly<Record<string, string>> = {
    Pending: 'payment.pending',
    Settled: 'payment.settled',
    Cancelled: 'payment.cancelled',
    Failed: 'payment.failed',
    Review: 'payment.review',
};

/**
 * Applies the pipeline's status to the Vendure payment(s) carrying its payment id: settle, decline,
 * or flag for an administrator. The webhook controller and the poller both come here, so a status
 * arriving twice (a redelivery, several server instances, the poller and a late webhook) changes
 * nothing twice: each payment's statuses are applied one at a time in this process, under a row
 * lock across processes on PostgreSQL/MySQL, and a transition is made only from Pending.
 */
@Injectable()
export class PaymentUpdater {
    constructor(
        private connection: TransactionalConnection,
        private orderService: OrderService,
        private channelService: ChannelService,
    ) {}

    /**
     * False when no payment of this channel and these payment methods has the pipeline's payment id.
     * `ctx` is a request context of `channel`.
     */
    async apply(ctx: RequestContext, channel: Channel, methodCodes: string[], status: PipelineStatus): Promise<boolean> {
        return serially(status.paymentId, () =>
            this.connection.withTransaction(ctx, txCtx => this.applyLocked(txCtx, channel, methodCodes, status)));
    }

    private async applyLocked(ctx: RequestContext, channel: Channel, methodCodes: string[], status: PipelineStatus) {
        const query = this.connection.getRepository(ctx, Payment).createQueryBuilder('payment')
            .innerJoinAndSelect('payment.order', 'order')
            .innerJoinAndSelect('order.channels', 'channel')
            .where('payment.transactionId = :tid', { tid: status.paymentId })
            .andWhere('payment.method IN (:...codes)', { codes: methodCodes })
            .orderBy('payment.id', 'ASC');
        if (['postgres', 'mysql', 'mariadb'].includes(this.connection.rawConnection.options.type)) {
            // Several Vendure server instances: the row lock serialises them as `serially` does
            // within one process (SQLite and sql.js have no row locks and one writer anyway).
            query.setLock('pessimistic_write', undefined, ['payment']);
        }
        // Every order is in the default channel too, and a method made in another channel is in the
        // default channel under the same code: only the order's own channel's secret may move it.
        const defaultChannel = await this.channelService.getDefaultChannel(ctx);
        const payments = (await query.getMany()).filter(p => ownChannelId(p.order.channels, defaultChannel.id) === channel.id);
        if (!payments.length) {
            return false;
        }
        const pending = payments.filter(p => p.state === ('Pending' as string));
        if (status.polled && !pending.length) {
            // The poller read the pipeline while the payment was Pending, outside these locks; a
            // webhook has moved it since, and it said what the poller's older reading would.
            return true;
        }
        const reason = clean(status.reason) ?? status.type;
        switch (status.type) {
            case 'payment.settled':
                await this.settle(ctx, payments, pending, status);
                break;
            case 'payment.cancelled':
            case 'payment.failed':
                // A late older event (a parked delivery redelivered) must not decline a payment the
                // pipeline has since put in Review: the customer would pay again while it may settle.
                for (const p of pending.filter(p => !happenedBefore(status.occurredAt, p.metadata?.reviewOccurredAt))) {
                    await this.decline(ctx, p, reason);
                }
                break;
            case 'payment.review':
                await this.flag(ctx, payments, reason, clean(status.lateMpesaReceipt), status.occurredAt);
                break;
            default: // payment.pending and anything newer: nothing to change
        }
        return true;
    }

    private async settle(ctx: RequestContext, payments: Payment[], pending: Payment[], status: PipelineStatus) {
        if (payments.some(p => p.state === 'Settled')) {
            return; // already settled: a redelivery or a concurrent duplicate
        }
        const [first, ...duplicates] = pending;
        const receipt = clean(status.mpesaReceipt);
        if (!first) {
            // Money moved for a payment Vendure already declined: an administrator must decide
            // (refund, or accept it for the order); nothing here may settle it silently.
            for (const p of payments) {
                p.metadata = merge(p.metadata, { needsReview: true, mpesaReceipt: receipt,
                    reviewReason: 'M-Pesa settled a payment this shop had already declined' });
                await this.save(ctx, p);
            }
            Logger.error(`payment.settled for payment ${payments[0].id}, no longer Pending: flagged for review`, loggerCtx);
            return;
        }
        if (!coversPayment(status, first)) {
            // A settled status for another sum than this payment's (a pipeline payment made for
            // another order, or a bug upstream): the goods must not ship on it, nor may the money
            // be ignored. An administrator decides.
            const reviewReason = clean(`M-Pesa settled KES ${String(status.amount)} ${String(status.currency ?? '')} ` +
                `for a payment of KES ${first.amount / 100}`);
            await this.flag(ctx, [first], reviewReason ?? 'amount differs', receipt);
            first.metadata = merge(first.metadata, { mpesaReceipt: receipt });
            await this.save(ctx, first);
            return;
        }
        // A payment flagged by an earlier payment.review is Pending still: the operator's
        // resolution (Settled) settles it, and it no longer waits for an administrator.
        first.metadata = merge(first.metadata, { [SETTLED_BY_PIPELINE]: true, mpesaReceipt: receipt,
            ...resolved(first), public: { mpesaStatus: 'Settled', mpesaReceipt: receipt } });
        await this.save(ctx, first);
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
        payment.metadata = merge(payment.metadata, { ...resolved(payment), public: { mpesaStatus: 'Declined', reason } });
        await this.save(ctx, payment);
        const result = await this.orderService.transitionPaymentToState(ctx, payment.id, 'Declined');
        if (!(result instanceof Payment)) {
            throw new Error(`declining payment ${payment.id} failed: ${(result as any).message}`);
        }
    }

    /** The payments stay in their state (a Pending one leaves the order unpaid) and wait for an administrator. */
    private async flag(ctx: RequestContext, payments: Payment[], reason: string, lateReceipt: string | null,
                       occurredAt?: unknown) {
        const unflagged = payments.filter(p => !(p.metadata?.needsReview === true && p.metadata?.reviewReason === reason));
        if (!unflagged.length) {
            return; // the same review again (a redelivery, or the poller reading it once more)
        }
        for (const p of unflagged) {
            p.metadata = merge(p.metadata, { needsReview: true, reviewReason: reason,
                ...(lateReceipt ? { lateMpesaReceipt: lateReceipt } : {}),
                ...(typeof occurredAt === 'string' ? { reviewOccurredAt: clean(occurredAt) } : {}),
                public: { mpesaStatus: 'Review' } });
            await this.save(ctx, p);
        }
        Logger.warn(`payment ${unflagged[0].id} needs an administrator: ${reason}`, loggerCtx);
    }

    private save(ctx: RequestContext, payment: Payment) {
        return this.connection.getRepository(ctx, Payment).save(payment, { reload: false });
    }
}

/** The channel an order was placed in: the one besides the default channel, which every order is in (as the poller finds it). */
function ownChannelId(channels: Channel[], defaultChannelId: ID): ID {
    return channels.find(c => c.id !== defaultChannelId)?.id ?? defaultChannelId;
}

/** Both are times and `event` is the earlier: an event older than what the payment already shows. */
function happenedBefore(event: unknown, known: unknown): boolean {
    const [a, b] = [typeof event === 'string' ? Date.parse(event) : NaN, typeof known === 'string' ? Date.parse(known) : NaN];
    return a < b; // false when either is missing or not a time
}

/** The pipeline's amount (whole shillings) is this payment's (minor units), in Kenyan shillings. */
function coversPayment(status: PipelineStatus, payment: Payment): boolean {
    const shillings = status.amount;
    return typeof shillings === 'number' && Number.isSafeInteger(shillings) && shillings * 100 === payment.amount
        && (status.currency === undefined || status.currency === 'KES');
}

/** A review flag the pipeline's final word has answered: kept as history, no longer asking. */
function resolved(payment: Payment): Record<string, unknown> {
    return payment.metadata?.needsReview === true ? { needsReview: false, reviewResolvedAt: new Date().toISOString() } : {};
}

export function clean(text: unknown): string | null {
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
