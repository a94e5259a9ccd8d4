export * from './handler';
export * from './plugin';
export * from './secrets';
export * from './states';
export { MpesaWebhookController, WEBHOOK_ROUTE } from './webhook.controller';
