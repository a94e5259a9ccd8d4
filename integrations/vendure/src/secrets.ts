/**
 * Where a Vendure channel's pipeline credentials come from: the process environment, never
 * Vendure's database (a database dump, a backup or an admin with "read settings" must not carry a
 * key that requests payments, nor the secret that makes a webhook believable).
 *
 *   MPESA_PIPELINE_API_KEY__<CODE>         the pipeline API key scoped to the channel's pipeline channel
 *   MPESA_PIPELINE_WEBHOOK_SECRET__<CODE>  the endpoint's signing secret (whsec_...); several,
 *                                          comma-separated, during a rotation
 *
 * <CODE> is the Vendure channel's code in upper case with every character other than A-Z and 0-9
 * replaced by `_` (the default channel `__default_channel__` is `__DEFAULT_CHANNEL__`).
 */
export function envSuffix(channelCode: string): string {
    return channelCode.toUpperCase().replace(/[^A-Z0-9]/g, '_');
}

export function apiKeyVariable(channelCode: string): string {
    return `MPESA_PIPELINE_API_KEY__${envSuffix(channelCode)}`;
}

export function webhookSecretVariable(channelCode: string): string {
    return `MPESA_PIPELINE_WEBHOOK_SECRET__${envSuffix(channelCode)}`;
}

export function apiKeyFor(channelCode: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
    return env[apiKeyVariable(channelCode)] || undefined;
}

export function webhookSecretsFor(channelCode: string, env: NodeJS.ProcessEnv = process.env): string[] {
    return (env[webhookSecretVariable(channelCode)] ?? '').split(',').map(s => s.trim()).filter(Boolean);
}
