/** The calls the shop makes to the pipeline's ingress (services/ingress/openapi.json): POST /api/payments,
 * and GET /api/payments/{id} for the poller. */

export interface PaymentRequest {
    channelId: string;
    amount: number; // whole shillings
    phone: string;
    accountReference: string;
    orderReference: string;
}

export type RequestOutcome =
    | { accepted: true; paymentId: string; state: string }
    | { accepted: false; message: string; status: number | null };

const TIMEOUT_MS = 15_000;
const MAX_MESSAGE = 300;

export async function requestPayment(
    ingressUrl: string,
    apiKey: string,
    idempotencyKey: string,
    request: PaymentRequest,
): Promise<RequestOutcome> {
    let response: Response;
    try {
        response = await fetch(new URL('/api/payments', ingressUrl), {
            method: 'POST',
            headers: {
                'Content-Type': 'application/json',
                Authorization: `Bearer ${apiKey}`,
                'Idempotency-Key': idempotencyKey,
            },
            body: JSON.stringify(request),
            redirect: 'error',
            signal: AbortSignal.timeout(TIMEOUT_MS),
        });
    } catch {
        // No answer: the payment may or may not exist; the same idempotency key on the next attempt
        // finds it again rather than prompting twice.
        return { accepted: false, status: null, message: 'The M-Pesa payment service did not answer; try again.' };
    }
    const body: any = await response.json().catch(() => null);
    if (response.status === 202 && typeof body?.paymentId === 'string') {
        return { accepted: true, paymentId: body.paymentId, state: String(body.state) };
    }
    return { accepted: false, status: response.status, message: problemMessage(response.status, body) };
}

/** The problem detail (RFC 9457) in a sentence the storefront can show. */
export function problemMessage(status: number, body: any): string {
    const parts: string[] = [];
    if (typeof body?.title === 'string') parts.push(body.title);
    if (typeof body?.detail === 'string') parts.push(body.detail);
    if (Array.isArray(body?.errors)) {
        for (const e of body.errors) {
            if (typeof e?.field === 'string' && typeof e?.message === 'string') parts.push(`${e.field}: ${e.message}`);
        }
    }
    const text = parts.length ? parts.join(' — ') : `The M-Pesa payment service answered ${status}.`;
    return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, ' ').slice(0, MAX_MESSAGE);
}

/** What the poller needs of GET /api/payments/{id}: the payment's state and its words on it. */
export interface PaymentView {
    state: string;
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
            // The reason of the change that made the state (the webhook's `reason`).
            reason: typeof last?.reason === 'string' && last?.state === body.state ? last.reason : null,
            mpesaReceipt: typeof body.mpesa?.receiptNumber === 'string' ? body.mpesa.receiptNumber : null,
        };
    } catch {
        return null; // the ingress is down or slow, or the body is not JSON: asked again next round
    }
}
