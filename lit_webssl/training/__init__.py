"""Training: the LightningModule, optimizer settings and step-indexed schedules."""
