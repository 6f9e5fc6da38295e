"""Pure tensor functions of the method: batched, stateless, no module imports above them."""
