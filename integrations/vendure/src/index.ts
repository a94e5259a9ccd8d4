export * from './handler';
export * from './options';
export { EVENT_OF_STATE, PaymentUpdater, PipelineStatus } from './payment-updater';
export * from './plugin';
export { PendingPaymentPoller } from './poller';
export * from './secrets';
export * from './states';
export { MpesaWebhookController, WEBHOOK_ROUTE } from './webhook.controller';
