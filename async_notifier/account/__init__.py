"""The mail provider's account, as every transport meets it: its rate, what holds for all."""
