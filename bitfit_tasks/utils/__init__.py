"""Plumbing every layer uses: the one user-error type, writes that are never half-done, running a
runner as a command (one line on a user error, a clean process-group exit), and the output-folder lock.
Imports nothing else of the package."""
