"""Training psi with the max-head InfoNCE recipe (method.md §3.4–3.6): `talk2dino train`."""
