"""Commands made of several tasks, submitted together as one durable group."""
