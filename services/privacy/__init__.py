"""Payers' data: retention (pseudonymised after N days) and a payer's own requests (erasure, access)."""
