/** The one call the shop makes to the pipeline: POST /api/payments (services/ingress/openapi.json). */

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
