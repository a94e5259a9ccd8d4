/**
 * A Vendure test server (@vendure/testing, sql.js in memory) with MpesaPipelinePlugin, for the
 * project's Python end-to-end tests, which start it as a process:
 *
 *   MPESA_PIPELINE_API_KEY____DEFAULT_CHANNEL__=... MPESA_PIPELINE_WEBHOOK_SECRET____DEFAULT_CHANNEL__=whsec_... \
 *   node dist/e2e/server.js --port 3050 --data-dir /tmp/x --pipeline-channel shop-1 --ingress-url http://127.0.0.1:8080
 *
 * The default channel is in KES and has the payment method `mpesa-stk`; products are in
 * e2e/fixtures/products.csv (KIKOY-1 at 100.00, CHAI-1 at 99.50, with cents). It prints
 * `VENDURE_READY port=<port>` once it serves, and stops on SIGTERM.
 */
import { mergeConfig } from '@vendure/core';
import { createTestEnvironment, registerInitializer, SqljsInitializer, testConfig } from '@vendure/testing';
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
            'data-dir': { type: 'string' },
            'pipeline-channel': { type: 'string' },
            'ingress-url': { type: 'string' },
        },
    });
    const port = Number(values.port);
    registerInitializer('sqljs', new SqljsInitializer(values['data-dir']!));
    const config = mergeConfig(testConfig, {
        apiOptions: { port },
        plugins: [MpesaPipelinePlugin],
    });
    const { server, adminClient } = createTestEnvironment(config);
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
    await adminClient.query(
        gql`mutation ($input: CreatePaymentMethodInput!) { createPaymentMethod(input: $input) { id } }`,
        {
            input: {
                code: 'mpesa-stk',
                enabled: true,
                handler: {
                    code: 'mpesa-stk',
                    arguments: [
                        { name: 'pipelineChannelId', value: values['pipeline-channel'] },
                        { name: 'ingressUrl', value: values['ingress-url'] },
                    ],
                },
                translations: [{ languageCode: 'en', name: 'M-Pesa' }],
            },
        },
    );
    console.log(`VENDURE_READY port=${port}`);
    const stop = async () => {
        await server.destroy();
        process.exit(0);
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
}

main().catch(e => {
    console.error(e);
    process.exit(1);
});
