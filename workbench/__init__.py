"""The application without a screen: projects, the run store, the job runner, the CLI."""
