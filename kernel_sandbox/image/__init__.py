"""Building images: a registry-free Debian base and the kernel image, hermetically."""
