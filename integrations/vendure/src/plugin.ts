import { PluginCommonModule, Type, VendurePlugin } from '@vendure/core';
import { raw } from 'express';

import { mpesaStkHandler } from './handler';
import { DEFAULT_OPTIONS, MPESA_PIPELINE_OPTIONS, MpesaPipelineOptions, withDefaults } from './options';
import { PaymentUpdater } from './payment-updater';
import { PendingPaymentPoller } from './poller';
import { mpesaOrderProcess, mpesaPaymentProcess } from './states';
import { MpesaWebhookController, WEBHOOK_ROUTE } from './webhook.controller';

/**
 * Pays orders by M-Pesa STK push through mpesa-pipeline: the `mpesa-stk` payment handler, the
 * Pending payment state, the controller receiving the pipeline's signed status webhooks, and a
 * poller asking the pipeline about payments left Pending (a lost webhook). Use the class itself
 * for the defaults, or `MpesaPipelinePlugin.init({...})` (src/options.ts).
 */
@VendurePlugin({
    imports: [PluginCommonModule],
    controllers: [MpesaWebhookController],
    providers: [
        { provide: MPESA_PIPELINE_OPTIONS, useFactory: () => MpesaPipelinePlugin.options },
        PaymentUpdater,
        PendingPaymentPoller,
    ],
    compatibility: '^3.0.0',
    configuration: config => {
        config.paymentOptions.paymentMethodHandlers.push(mpesaStkHandler);
        config.paymentOptions.process = [...(config.paymentOptions.process ?? []), mpesaPaymentProcess];
        config.orderOptions.process = [...(config.orderOptions.process ?? []), mpesaOrderProcess];
        // The signature covers the exact bytes sent, so the body must reach the controller unparsed
        // (and bounded: a webhook body is a few hundred bytes).
        config.apiOptions.middleware.push({
            route: `/${WEBHOOK_ROUTE}`,
            handler: raw({ type: '*/*', limit: '64kb' }),
            beforeListen: true,
        });
        return config;
    },
})
export class MpesaPipelinePlugin {
    static options: Required<MpesaPipelineOptions> = DEFAULT_OPTIONS;

    static init(options: MpesaPipelineOptions): Type<MpesaPipelinePlugin> {
        MpesaPipelinePlugin.options = withDefaults(options);
        return MpesaPipelinePlugin;
    }
}
