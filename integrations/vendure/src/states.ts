import { OrderProcess, PaymentProcess } from '@vendure/core';

declare module '@vendure/core/dist/service/helpers/payment-state-machine/payment-state' {
    interface PaymentStates {
        // The push was accepted and the customer is being prompted; only the pipeline's webhook
        // moves the payment on.
        Pending: never;
    }
}

/**
 * Vendure's default process knows Authorized, Settled, Declined, Error and Cancelled; an STK push is
 * none of them until the customer answers the prompt, so payments of this handler start Pending.
 * Merged into the default process (Vendure merges every configured PaymentProcess).
 */
export const mpesaPaymentProcess: PaymentProcess<'Pending'> = {
    transitions: {
        Created: { to: ['Pending'], mergeStrategy: 'merge' },
        Pending: { to: ['Settled', 'Declined', 'Cancelled', 'Error'] },
    },
};

/**
 * An order whose M-Pesa prompt is still open cannot be cancelled: the customer may still pay it,
 * and the money would then settle a payment of a cancelled order with nobody told. The pipeline's
 * webhook ends the prompt either way within minutes (settled, or declined, and then the order can go).
 */
export const mpesaOrderProcess: OrderProcess<never> = {
    onTransitionStart(fromState, toState, { order }) {
        if (toState === 'Cancelled' && (order.payments ?? []).some(p => p.state === ('Pending' as string))) {
            return 'An M-Pesa prompt for this order is still open: wait until it is paid or declined, then cancel.';
        }
    },
};
