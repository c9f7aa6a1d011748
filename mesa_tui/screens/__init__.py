"""Screens of the terminal app: jobs, run, new job, study, compare, and the modals."""
