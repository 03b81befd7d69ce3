"""Pure detector and session-tracker library (numpy, scipy, scikit-learn; no web, no clock)."""
