/**
 * A Vendure test server (@vendure/testing on PostgreSQL) with MpesaPipelinePlugin, for the
 * project's Python end-to-end tests, which start it as a process:
 *
 *   PGHOST=127.0.0.1 PGPORT=5433 PGUSER=... PGPASSWORD=... PGDATABASE=... \
 *   MPESA_PIPELINE_API_KEY____DEFAULT_CHANNEL__=... MPESA_PIPELINE_WEBHOOK_SECRET____DEFAULT_CHANNEL__=whsec_... \
 *   node dist/e2e/server.js --port 3050 --schema vendure_e2e --pipeline-channel shop-1 --ingress-url http://127.0.0.1:8080
 *
 * Its tables live in the given schema, which must exist and be empty: this server creates and
 * populates them. With --shared it is a further instance of the same shop: it only starts on the
 * tables another instance populated (as a shop runs several servers on one database).
 * --slow-payment-reads-ms N makes this instance take N ms more over every read of payments, as a
 * loaded server would: a race test uses it to widen the gap between a read and the write after it.
 *
 * The default channel is in KES and has the payment method `mpesa-stk`; products are in
 * e2e/fixtures/products.csv (KIKOY-1 at 100.00, CHAI-1 at 99.50, with cents). The poller is off
 * unless --poll-interval-seconds is given (with --poll-pending-after-seconds). It prints
 * `VENDURE_READY port=<port>` once it serves, and stops on SIGTERM.
 */
import { mergeConfig, Payment } from '@vendure/core';
import {
    createTestEnvironment, E2E_DEFAULT_CHANNEL_TOKEN, registerInitializer, SimpleGraphQLClient, testConfig,
} from '@vendure/testing';
import { EntitySubscriberInterface, EventSubscriber } from 'typeorm';
import type { PostgresConnectionOptions } from 'typeorm/driver/postgres/PostgresConnectionOptions';
import gql from 'graphql-tag';
import path from 'path';
import { parseArgs } from 'util';

import { MpesaPipelinePlugin } from '../src';

async function main() {
    // Vendure 3.7 reports installs to vendure.io unless told not to; a test server never should.
    process.env.VENDURE_DISABLE_TELEMETRY = 'true';
    const { values } = parseArgs({
        options: {
            port: { type: 'string' },
            schema: { type: 'string' },
            shared: { type: 'boolean', default: false },
            'slow-payment-reads-ms': { type: 'string', default: '0' },
            'pipeline-channel': { type: 'string' },
            'ingress-url': { type: 'string' },
            // <vendure channel code>=<pipeline channel id>: a further Vendure channel, made here
            channel: { type: 'string', multiple: true },
            // The poller of payments left Pending (off unless given, so webhook tests see webhooks only).
            'poll-interval-seconds': { type: 'string', default: '0' },
            'poll-pending-after-seconds': { type: 'string', default: '180' },
        },
    });
    const port = Number(values.port);
    // The database the caller made: the tests' own PostgreSQL, in a schema of the shop's own.
    // (@vendure/testing's PostgresInitializer would create a database, which needs a role allowed to.)
    registerInitializer('postgres', { init: async (_, options) => options, populate: fn => fn(), destroy: () => {} });
    const database: PostgresConnectionOptions = {
        type: 'postgres',
        host: process.env.PGHOST,
        port: Number(process.env.PGPORT),
        username: process.env.PGUSER,
        password: process.env.PGPASSWORD,
        database: process.env.PGDATABASE,
        schema: values.schema,
        // The first instance makes the tables; a shared one must not touch them.
        synchronize: !values.shared,
        logging: false,
        subscribers: [slowPaymentReads(Number(values['slow-payment-reads-ms']))],
    };
    const config = { ...mergeConfig(testConfig, { apiOptions: { port }, plugins: [MpesaPipelinePlugin.init({
            pollIntervalSeconds: Number(values['poll-interval-seconds']),
            pollPendingAfterSeconds: Number(values['poll-pending-after-seconds']),
        })] }),
                     dbConnectionOptions: database };
    const { server, adminClient } = createTestEnvironment(config);
    const stop = async () => {
        await server.destroy();
        process.exit(0);
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    if (values.shared) {
        await server.bootstrap();
        console.log(`VENDURE_READY port=${port}`);
        return;
    }
    await server.init({
        initialData: {
            defaultLanguage: 'en' as any,
            defaultZone: 'Africa',
            taxRates: [{ name: 'Standard Tax', percentage: 0 }],
            shippingMethods: [{ name: 'Pickup', price: 0 }],
            paymentMethods: [],
            collections: [],
            countries: [{ name: 'Kenya', code: 'KE', zone: 'Africa' }],
        },
        productsCsvPath: path.join(__dirname, '..', '..', 'e2e', 'fixtures', 'products.csv'),
        customerCount: 1,
    });
    await adminClient.asSuperAdmin();
    // Changing the default currency also moves the imported prices to it.
    await adminClient.query(gql`
        mutation { updateChannel(input: { id: "T_1", defaultCurrencyCode: KES, availableCurrencyCodes: [KES] }) {
            ... on Channel { id } } }`);
    await addPaymentMethod(adminClient, values['pipeline-channel']!, values['ingress-url']!);
    for (const spec of values.channel ?? []) {
        const [code, pipelineChannel] = spec.split('=');
        await addChannel(adminClient, code);
        adminClient.setChannelToken(`${code}-token`);
        await addPaymentMethod(adminClient, pipelineChannel, values['ingress-url']!);
        adminClient.setChannelToken(E2E_DEFAULT_CHANNEL_TOKEN);
    }
    console.log(`VENDURE_READY port=${port}`);
}

/** A TypeORM subscriber delaying each query that loads payments by `delayMs` after it ran. */
function slowPaymentReads(delayMs: number) {
    @EventSubscriber() // TypeORM takes only the subscriber classes it saw decorated
    class SlowPaymentReads implements EntitySubscriberInterface<Payment> {
        listenTo() {
            return Payment;
        }

        async afterLoad() {
            if (delayMs > 0) await new Promise(resolve => setTimeout(resolve, delayMs));
        }
    }
    return SlowPaymentReads;
}

/** A KES channel (token `<code>-token`) selling the default channel's products at the same prices. */
async function addChannel(admin: SimpleGraphQLClient, code: string) {
    const { zones } = await admin.query(gql`{ zones { items { id name } } }`);
    const zone = zones.items.find((z: any) => z.name === 'Africa').id;
    const { createChannel } = await admin.query(gql`
        mutation ($input: CreateChannelInput!) { createChannel(input: $input) {
            ... on Channel { id } ... on ErrorResult { message } } }`, {
        input: { code, token: `${code}-token`, defaultLanguageCode: 'en', currencyCode: 'KES', pricesIncludeTax: true,
                 defaultShippingZoneId: zone, defaultTaxZoneId: zone },
    });
    const { products } = await admin.query(gql`{ products { items { id } } }`);
    await admin.query(gql`mutation ($input: AssignProductsToChannelInput!) { assignProductsToChannel(input: $input) { id } }`,
        { input: { channelId: createChannel.id, productIds: products.items.map((p: any) => p.id), priceFactor: 1 } });
    const { shippingMethods } = await admin.query(gql`{ shippingMethods { items { id } } }`);
    await admin.query(gql`mutation ($input: AssignShippingMethodsToChannelInput!) {
        assignShippingMethodsToChannel(input: $input) { id } }`,
        { input: { channelId: createChannel.id, shippingMethodIds: shippingMethods.items.map((m: any) => m.id) } });
}

async function addPaymentMethod(admin: SimpleGraphQLClient, pipelineChannel: string, ingressUrl: string) {
    await admin.query(
        gql`mutation ($input: CreatePaymentMethodInput!) { createPaymentMethod(input: $input) { id } }`,
        {
            input: {
                code: 'mpesa-stk',
                enabled: true,
                handler: {
                    code: 'mpesa-stk',
                    arguments: [
                        { name: 'pipelineChannelId', value: pipelineChannel },
                        { name: 'ingressUrl', value: ingressUrl },
                    ],
                },
                translations: [{ languageCode: 'en', name: 'M-Pesa' }],
            },
        },
    );
}

main().catch(e => {
    console.error(e);
    process.exit(1);
});
