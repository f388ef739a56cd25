"""Actions: the code that does a task's work, registered under a name."""
