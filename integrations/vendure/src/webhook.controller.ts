import { Controller, Param, Post, Req, Res } from '@nestjs/common';
import { Channel, Logger, PaymentMethodService, RequestContextService, TransactionalConnection } from '@vendure/core';
import type { Request, Response } from 'express';
import { Webhook, WebhookVerificationError } from 'standardwebhooks';

import { HANDLER_CODE, loggerCtx } from './handler';
import { PaymentUpdater } from './payment-updater';
import { webhookSecretsFor, webhookSecretVariable } from './secrets';

export const WEBHOOK_ROUTE = 'mpesa-pipeline/webhooks';

interface StatusEvent {
    type: string;
    data: { paymentId: string; channelId: string; state: string; amount?: unknown; currency?: unknown; reason?: string | null;
            mpesaReceipt?: string | null; lateMpesaReceipt?: string | null; occurredAt?: unknown };
}

/**
 * Receives the pipeline's signed status webhooks at POST /mpesa-pipeline/webhooks/<Vendure channel
 * code>. The URL names the Vendure channel, whose secret (from the environment) must verify the
 * body; the body's pipeline channel must be one that channel's payment methods use. Deliveries are
 * at least once and may race; PaymentUpdater applies them, so a repeated or concurrent event
 * changes nothing twice.
 */
@Controller(WEBHOOK_ROUTE)
export class MpesaWebhookController {
    constructor(
        private connection: TransactionalConnection,
        private requestContextService: RequestContextService,
        private paymentMethodService: PaymentMethodService,
        private updater: PaymentUpdater,
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
        const { paymentId, amount, currency, reason, mpesaReceipt, lateMpesaReceipt, occurredAt } = event.data;
        const found = await this.updater.apply(ctx, channel, methods.map(m => m.code),
            { type: event.type, paymentId, amount, currency, reason, mpesaReceipt, lateMpesaReceipt, occurredAt });
        return void res.status(found ? 204 : 404).send();
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
            // A SyntaxError: the signature verified but the body is not JSON (standardwebhooks parses it).
            if (!(e instanceof WebhookVerificationError || e instanceof SyntaxError)) throw e;
        }
    }
    return null;
}
