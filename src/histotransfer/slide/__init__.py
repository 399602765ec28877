"""slide stage."""
