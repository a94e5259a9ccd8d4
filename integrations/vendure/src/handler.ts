import { CreatePaymentResult, LanguageCode, Logger, Payment, PaymentMethodHandler } from '@vendure/core';
import { createHash } from 'crypto';

import { paymentsEndpoint, requestPayment } from './ingress';
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
        const declined = (errorMessage: string, keys: KeyMetadata = {}): CreatePaymentResult => ({
            amount,
            state: 'Declined' as const,
            errorMessage,
            metadata: { ...keys, public: { mpesaStatus: 'Declined', reason: errorMessage } },
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
        const phone = metadata?.phone;
        // The pipeline reads at most 32 characters; anything longer is not a phone number and is
        // not sent (nor stored: only the key and the pipeline's answer go into the payment).
        if (typeof phone !== 'string' || !phone.trim() || phone.length > 32) {
            return declined('A phone number (metadata.phone, a string such as "0712345678") is needed for an M-Pesa payment.');
        }
        const channelCode = ctx.channel.code;
        const apiKey = apiKeyFor(channelCode);
        const endpoint = paymentsEndpoint(args.ingressUrl);
        if (!apiKey || !endpoint) {
            Logger.error(apiKey ? `payment method ${method.code}: ingressUrl is not an http(s) URL without credentials`
                : `${apiKeyVariable(channelCode)} is not set: no M-Pesa payment in this channel`, loggerCtx);
            return declined('M-Pesa payments are not configured for this shop.');
        }
        // An attempt whose outcome is unknown may have made a pipeline payment: the next attempt
        // asks with its key again (the pipeline answers the same payment, or makes it now), so the
        // customer is prompted at most once for it. Otherwise the same order and attempt number
        // give the same key, so a checkout retried after a crash (its payment never saved) finds
        // the pipeline's payment again; each finished attempt moves the next one to a new key.
        const reused = unresolvedKey(earlier);
        const idempotencyKey = reused ?? `vendure:${orderKeyPart(order.code)}:${earlier.length + 1}`;
        const outcome = await requestPayment(endpoint, apiKey, idempotencyKey, {
            channelId: args.pipelineChannelId,
            amount: amount / 100,
            phone,
            accountReference: accountReference(order.code),
            orderReference: orderReference(order.code),
        });
        switch (outcome.kind) {
            case 'unknown':
                Logger.warn(`order ${order.code}: the pipeline's answer to ${endpoint.origin} was lost (${outcome.why}); `
                    + 'the next attempt asks with the same Idempotency-Key', loggerCtx);
                return declined('The M-Pesa payment service did not answer. Try again: you will not be prompted twice.',
                    { idempotencyKey, keyOpen: true });
            case 'refused':
                if (outcome.status === 409) {
                    // The key names a request with another phone or amount, which may be prompting now.
                    return declined('An earlier M-Pesa request for this order got no answer and may have reached a phone: '
                        + 'pay again with the same phone number, or ask the shop.', { idempotencyKey, keyOpen: true });
                }
                if ([401, 403, 404, 422].includes(outcome.status)) {
                    Logger.error(`payment method ${method.code}: the pipeline refused (${outcome.message})`, loggerCtx);
                }
                // A refusal is decided before the ingress records the key: a key that was open stays open.
                return declined(outcome.message, { idempotencyKey, keyOpen: reused !== undefined || undefined });
            case 'accepted':
                if (outcome.state === 'Cancelled' || outcome.state === 'Failed') {
                    // The key's payment (an earlier attempt's, replayed) ended unpaid: the next attempt is new.
                    return declined(`The earlier M-Pesa request for this order was ${outcome.state.toLowerCase()}; pay again.`,
                        { idempotencyKey });
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
        }
    },

    // An administrator cancelling a Pending payment would not stop the prompt on the customer's
    // phone: the money could still arrive for a payment the shop has given up. The pipeline's
    // payment.cancelled / payment.failed ends it (the webhook writes mpesaStatus Declined first, so
    // a transition to Cancelled made on the pipeline's word goes through); until then it stays Pending.
    cancelPayment: async (ctx, order, payment) => {
        if (payment.state === ('Pending' as string) && payment.metadata?.public?.mpesaStatus !== 'Declined') {
            return { success: false, state: 'Pending' as any,
                errorMessage: 'The M-Pesa prompt may still be answered: the pipeline declines this payment when it ends.' };
        }
        return { success: true };
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

/** What a payment's metadata says about its Idempotency-Key (kept private: the Shop API shows only `public`). */
interface KeyMetadata {
    idempotencyKey?: string;
    keyOpen?: true; // the attempt's outcome is unknown: the pipeline may hold a payment for the key
}

/** The key of an attempt whose outcome is still unknown: open, and no later payment of the order has it settled. */
export function unresolvedKey(payments: Pick<Payment, 'metadata'>[]): string | undefined {
    const keys = payments.map(p => (p.metadata ?? {}) as KeyMetadata).filter(m => typeof m.idempotencyKey === 'string');
    const resolved = new Set(keys.filter(m => m.keyOpen !== true).map(m => m.idempotencyKey));
    return keys.find(m => m.keyOpen === true && !resolved.has(m.idempotencyKey))?.idempotencyKey;
}

/** The order's part of the Idempotency-Key (1-255 visible ASCII): the code, or its digest when a custom
 * OrderCodeStrategy makes codes with other characters or very long ones. */
export function orderKeyPart(orderCode: string): string {
    return /^[\x21-\x7e]{1,200}$/.test(orderCode) ? orderCode : `sha256-${createHash('sha256').update(orderCode).digest('hex')}`;
}

/** The pipeline's orderReference (1-128 characters, no control characters), or none for a code that is not one. */
export function orderReference(orderCode: string): string | undefined {
    return orderCode.length <= 128 && !/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/.test(orderCode) ? orderCode : undefined;
}

/** Daraja's AccountReference: at most 12 of [A-Za-z0-9 -]; Vendure's order codes are 16, so the tail. */
export function accountReference(orderCode: string): string {
    return orderCode.replace(/[^A-Za-z0-9 -]/g, '').slice(-12).trim() || 'ORDER';
}
