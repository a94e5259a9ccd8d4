"""Operating the pipeline: the review desk (search and show payments, ask the ledger to query or
resolve one) and merchant statements. Reads as the onboarding database role; an operator's
instruction reaches the ledger only as an OperatorCommand event, so the ledger stays the one writer
of payments."""
