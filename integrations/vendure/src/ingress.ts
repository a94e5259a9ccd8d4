/** The calls the shop makes to the pipeline's ingress (services/ingress/openapi.json): POST /api/payments,
 * and GET /api/payments/{id} for the poller. */

export interface PaymentRequest {
    channelId: string;
    amount: number; // whole shillings
    phone: string;
    accountReference: string;
    orderReference?: string;
}

/**
 * What the answer tells about the payment the request names:
 * - accepted: the pipeline holds a payment for the key (new, or an earlier request's, replayed);
 * - refused: a 4xx problem detail; the ingress checks everything before it records a key, so only
 *   409 (the key already names another request) says the key is in use;
 * - unknown: no answer, a 5xx, or an answer that is not the contract's; the pipeline may hold a
 *   payment for the key, so the key must be reused, never replaced.
 */
export type RequestOutcome =
    | { kind: 'accepted'; paymentId: string; state: string }
    | { kind: 'refused'; status: number; message: string }
    | { kind: 'unknown'; why: string };

const TIMEOUT_MS = 15_000;
const MAX_MESSAGE = 300;
// A problem detail or a 202 is a few hundred bytes; a larger answer is not the ingress's.
const MAX_ANSWER_BYTES = 64 * 1024;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
// Foreign text shown to customers and stored: no control, line-separator, zero-width or bidi characters.
const UNSHOWABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]/g;

/**
 * Where POST /api/payments is, from the handler's `ingressUrl` argument; null unless it is a plain
 * http(s) URL (no credentials in it: the API key goes in a header, and a URL ends up in logs). A
 * path in it is kept as a prefix (https://gw.example/pipeline -> .../pipeline/api/payments).
 */
export function paymentsEndpoint(ingressUrl: unknown): URL | null {
    let base: URL;
    try {
        base = new URL(String(ingressUrl));
    } catch {
        return null;
    }
    if (!['http:', 'https:'].includes(base.protocol) || base.username || base.password) {
        return null;
    }
    base.search = '';
    base.hash = '';
    if (!base.pathname.endsWith('/')) base.pathname += '/';
    return new URL('api/payments', base);
}

export async function requestPayment(
    endpoint: URL,
    apiKey: string,
    idempotencyKey: string,
    request: PaymentRequest,
): Promise<RequestOutcome> {
    let response: Response;
    let text: string | null;
    try {
        response = await fetch(endpoint, {
            method: 'POST',
            headers: {
                'Content-Type': 'application/json',
                Authorization: `Bearer ${apiKey}`,
                'Idempotency-Key': idempotencyKey,
            },
            body: JSON.stringify(request),
            // The ingress never redirects: a redirect comes from something else, which must not be
            // sent the API key again.
            redirect: 'error',
            signal: AbortSignal.timeout(TIMEOUT_MS),
        });
        text = await readBounded(response, MAX_ANSWER_BYTES);
    } catch (e) {
        return { kind: 'unknown', why: describe(e) };
    }
    const body = parseJson(text);
    if (response.status === 202) {
        if (typeof body?.paymentId === 'string' && UUID.test(body.paymentId) && body.channelId === request.channelId &&
            typeof body.state === 'string') {
            return { kind: 'accepted', paymentId: body.paymentId, state: body.state };
        }
        return { kind: 'unknown', why: 'a 202 without the payment the contract describes' };
    }
    if (response.status >= 400 && response.status < 500) {
        return { kind: 'refused', status: response.status, message: problemMessage(response.status, body) };
    }
    return { kind: 'unknown', why: `answered ${response.status}` };
}

/** The problem detail (RFC 9457) in a sentence the storefront can show. */
export function problemMessage(status: number, body: any): string {
    const parts: string[] = [];
    if (typeof body?.title === 'string') parts.push(body.title);
    if (typeof body?.detail === 'string') parts.push(body.detail);
    if (Array.isArray(body?.errors)) {
        for (const e of body.errors.slice(0, 10)) {
            if (typeof e?.field === 'string' && typeof e?.message === 'string') parts.push(`${e.field}: ${e.message}`);
        }
    }
    const text = parts.map(p => p.slice(0, MAX_MESSAGE)).join(' — ') || `The M-Pesa payment service answered ${status}.`;
    return showable(text, MAX_MESSAGE);
}

export function showable(text: string, max: number): string {
    return text.replace(UNSHOWABLE, ' ').slice(0, max);
}

async function readBounded(response: Response, max: number): Promise<string | null> {
    if (!response.body) return '';
    const chunks: Uint8Array[] = [];
    let size = 0;
    for await (const chunk of response.body as any as AsyncIterable<Uint8Array>) {
        size += chunk.length;
        if (size > max) {
            return null; // leaving the loop cancels the rest of the stream
        }
        chunks.push(chunk);
    }
    return Buffer.concat(chunks).toString('utf8');
}

function parseJson(text: string | null): any {
    try {
        return text === null ? null : JSON.parse(text);
    } catch {
        return null;
    }
}

/** The error's kind for a log (names and codes only: a message could quote a URL or a header). */
function describe(e: unknown): string {
    const error = e as { name?: unknown; cause?: { code?: unknown; name?: unknown } };
    const cause = error?.cause?.code ?? error?.cause?.name;
    return showable([error?.name, cause].filter(x => typeof x === 'string').join(': ') || 'no answer', 100);
}

/** What the poller needs of GET /api/payments/{id}: the payment's state and its words on it. */
export interface PaymentView {
    state: string;
    amount: unknown; // whole shillings
    reason: string | null;
    mpesaReceipt: string | null;
}

const READ_TIMEOUT_MS = 10_000;

/**
 * The pipeline's payment, or null when it cannot be had now (no answer, not found for this key,
 * or a body that is not the payment asked for: it must name the same payment and pipeline channel).
 */
export async function readPayment(
    ingressUrl: string,
    apiKey: string,
    pipelineChannelId: string,
    paymentId: string,
): Promise<PaymentView | null> {
    try {
        const response = await fetch(new URL(`/api/payments/${encodeURIComponent(paymentId)}`, ingressUrl), {
            headers: { Authorization: `Bearer ${apiKey}`, Accept: 'application/json' },
            redirect: 'error',
            signal: AbortSignal.timeout(READ_TIMEOUT_MS),
        });
        if (response.status !== 200) {
            await response.body?.cancel();
            return null;
        }
        const body: any = await response.json();
        if (body?.paymentId !== paymentId || body?.channelId !== pipelineChannelId || typeof body?.state !== 'string') {
            return null;
        }
        const history = Array.isArray(body.history) ? body.history : [];
        const last = history[history.length - 1];
        return {
            state: body.state,
            amount: body.amount,
            // The reason of the change that made the state (the webhook's `reason`).
            reason: typeof last?.reason === 'string' && last?.state === body.state ? last.reason : null,
            mpesaReceipt: typeof body.mpesa?.receiptNumber === 'string' ? body.mpesa.receiptNumber : null,
        };
    } catch {
        return null; // the ingress is down or slow, or the body is not JSON: asked again next round
    }
}
