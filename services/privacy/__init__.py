"""Payers' data: its retention (retention.py, run by __main__: pseudonymised N days after a payment's
final state), a payer's own requests (payers.py: access and erasure), and the one scrub (scrub.py)
both apply to payments."""
