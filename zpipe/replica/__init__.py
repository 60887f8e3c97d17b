"""One replica of one stage: its input and output, its delivery, and what it does per item."""
