"""Methods side by side on one task: run each in its own process, record, report, advise."""
