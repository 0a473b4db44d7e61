"""What an operator sees: one line per stage (progress) and the bars of the long stages (progress_bars)."""
