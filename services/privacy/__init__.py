"""The privacy service: the retention of payers' data (retention.py, run by __main__), and the one
scrub (scrub.py) that both the retention and a payer's erasure apply to payments."""
