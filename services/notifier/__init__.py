"""The notifier: delivers each payment's status changes to its channel's webhook endpoints, signed
as the Standard Webhooks specification describes (docs/webhooks.md).

Shape:
- `events.py`: pure. Which status event becomes which webhook event type, and the JSON body.
- `destinations.py`: pure apart from DNS. Which URLs and addresses a delivery may go to (SSRF).
- `secrets.py`: signing secrets: made here, sealed by the vault to the notifier's key, opened
  only by the notifier.
- `settings.py`: the notifier's and the endpoint management's configuration.
"""
