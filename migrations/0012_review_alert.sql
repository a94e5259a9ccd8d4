-- Why a payment is in Review, as the alert label that sent it there (services/ledger/state_machine.py):
-- a Review the review deadline alone caused ('unresolved') ends Failed when Daraja's definite refusal
-- of a push it never accepted arrives later; a Review for a contradiction stays for an operator.
ALTER TABLE payments ADD COLUMN review_alert text;
-- Rows in Review before this migration said why only in words: the deadline's words name it.
UPDATE payments SET review_alert = 'unresolved'
    WHERE state = 'Review' AND review_reason LIKE 'no final answer after % s of callbacks and queries';
