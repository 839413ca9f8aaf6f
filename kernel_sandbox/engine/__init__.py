"""The container engine: the only code that talks to Docker (the docker SDK)."""
