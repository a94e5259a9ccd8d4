/** MpesaPipelinePlugin.init's options (all optional). */
export interface MpesaPipelineOptions {
    /**
     * A payment still Pending this long after Vendure recorded it is asked about with
     * GET /api/payments/{id}, in case its webhook was lost. Default 180 (the prompt itself times
     * out after about a minute and the pipeline settles the outcome soon after).
     */
    pollPendingAfterSeconds?: number;
    /** Seconds between two rounds of the poller; 0 switches it off. Default 60. */
    pollIntervalSeconds?: number;
    /** At most this many payments are asked about per round (the others in later rounds). Default 20. */
    pollBatchSize?: number;
}

export const MPESA_PIPELINE_OPTIONS = Symbol('MPESA_PIPELINE_OPTIONS');

export const DEFAULT_OPTIONS: Required<MpesaPipelineOptions> = {
    pollPendingAfterSeconds: 180,
    pollIntervalSeconds: 60,
    pollBatchSize: 20,
};

const MAX_TIMER_MS = 2 ** 31 - 1; // setInterval's delay is a signed 32-bit number of milliseconds

/** The options with their defaults; nonsense (negative, not a number) fails at boot, not later. */
export function withDefaults(options: MpesaPipelineOptions): Required<MpesaPipelineOptions> {
    const merged = { ...DEFAULT_OPTIONS, ...options };
    for (const [name, value] of Object.entries(merged)) {
        if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
            throw new Error(`MpesaPipelinePlugin: ${name} must be a number of 0 or more, not ${String(value)}`);
        }
    }
    // Node runs a longer setInterval every millisecond (TimeoutOverflowWarning), not hardly ever.
    if (merged.pollIntervalSeconds * 1000 > MAX_TIMER_MS) {
        throw new Error(`MpesaPipelinePlugin: pollIntervalSeconds must be at most ${Math.floor(MAX_TIMER_MS / 1000)}`);
    }
    if (!Number.isInteger(merged.pollBatchSize) || merged.pollBatchSize < 1) {
        throw new Error('MpesaPipelinePlugin: pollBatchSize must be a whole number of 1 or more');
    }
    return merged;
}
