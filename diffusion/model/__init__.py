"""Networks (``nets``), noise schedules, losses and samplers."""
