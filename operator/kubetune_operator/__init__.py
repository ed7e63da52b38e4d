"""kubetune operator: turns FineTuneJobs into Kubernetes Jobs, and the `kubetune` command line."""
