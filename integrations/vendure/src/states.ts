import { PaymentProcess } from '@vendure/core';

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
