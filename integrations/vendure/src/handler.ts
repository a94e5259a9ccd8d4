import { CreatePaymentResult, LanguageCode, Logger, PaymentMethodHandler } from '@vendure/core';

import { requestPayment } from './ingress';
import { apiKeyFor, apiKeyVariable } from './secrets';

export const HANDLER_CODE = 'mpesa-stk';
export const loggerCtx = 'MpesaPipelinePlugin';

/** What the webhook controller writes before settling, so that only the pipeline's word settles. */
export const SETTLED_BY_PIPELINE = 'settledByPipeline';

export const mpesaStkHandler = new PaymentMethodHandler({
    code: HANDLER_CODE,
    description: [{ languageCode: LanguageCode.en, value: 'M-Pesa (STK push through mpesa-pipeline)' }],
    args: {
        pipelineChannelId: {
            type: 'string',
            label: [{ languageCode: LanguageCode.en, value: 'Pipeline channel id' }],
        },
        ingressUrl: {
            type: 'string',
            label: [{ languageCode: LanguageCode.en, value: 'Pipeline ingress URL' }],
        },
    },

    createPayment: async (ctx, order, amount, args, metadata, method): Promise<CreatePaymentResult> => {
        const declined = (errorMessage: string): CreatePaymentResult => ({
            amount,
            state: 'Declined' as const,
            errorMessage,
            metadata: { public: { mpesaStatus: 'Declined', reason: errorMessage } },
        });
        // First: Vendure counts a Pending payment as covering the order, so the amount asked
        // for next is nothing or less.
        const earlier = (order.payments ?? []).filter(p => p.method === method.code);
        if (earlier.some(p => p.state === 'Pending')) {
            // A prompt is already with the customer; a second one would be a second charge.
            return declined('An M-Pesa prompt for this order is already waiting on the phone; answer it first.');
        }
        if (order.currencyCode !== 'KES') {
            return declined(`M-Pesa takes Kenyan shillings; this order is in ${order.currencyCode}.`);
        }
        if (!Number.isInteger(amount) || amount <= 0) {
            return declined('Nothing is left to pay on this order.');
        }
        // Vendure keeps minor units (cents); M-Pesa takes whole shillings. Rounding would charge
        // the customer a different amount from the order's, so an amount with cents is refused.
        if (amount % 100 !== 0) {
            return declined(
                `M-Pesa takes whole shillings; this payment is KES ${(amount / 100).toFixed(2)}, which has cents.`,
            );
        }
        const phone = typeof metadata?.phone === 'string' ? metadata.phone : '';
        if (!phone) {
            return declined('A phone number (metadata.phone) is needed for an M-Pesa payment.');
        }
        const channelCode = ctx.channel.code;
        const apiKey = apiKeyFor(channelCode);
        if (!apiKey) {
            Logger.error(`${apiKeyVariable(channelCode)} is not set: no M-Pesa payment in this channel`, loggerCtx);
            return declined('M-Pesa payments are not configured for this shop.');
        }
        // The same order and attempt always give the same key, so a checkout retried after a crash
        // (its payment never saved) finds the pipeline's payment again instead of prompting twice;
        // each finished attempt (declined, cancelled) moves the next one to a new key.
        const idempotencyKey = `vendure:${order.code}:${earlier.length + 1}`;
        const outcome = await requestPayment(args.ingressUrl, apiKey, idempotencyKey, {
            channelId: args.pipelineChannelId,
            amount: amount / 100,
            phone,
            accountReference: accountReference(order.code),
            orderReference: order.code,
        });
        if (!outcome.accepted) {
            return declined(outcome.message);
        }
        return {
            amount,
            state: 'Pending' as any,
            transactionId: outcome.paymentId,
            metadata: {
                pipelineChannelId: args.pipelineChannelId,
                idempotencyKey,
                public: { mpesaStatus: 'Pending' },
            },
        };
    },

    settlePayment: async (ctx, order, payment) => {
        if (payment.metadata?.[SETTLED_BY_PIPELINE] === true) {
            return { success: true };
        }
        // An administrator's "settle" in the dashboard would mark goods paid with no money: only
        // the pipeline's signed payment.settled settles an M-Pesa payment.
        return {
            success: false,
            state: payment.state as any,
            errorMessage: 'Only the pipeline settles an M-Pesa payment (its payment.settled webhook).',
        };
    },
});

/** Daraja's AccountReference: at most 12 of [A-Za-z0-9 -]; Vendure's order codes are 16, so the tail. */
export function accountReference(orderCode: string): string {
    return orderCode.replace(/[^A-Za-z0-9 -]/g, '').slice(-12) || 'ORDER';
}
