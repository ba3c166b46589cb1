"""The parts of the key-service benchmark (`bench/keys.py` wires them together): encrypt and
decrypt per value, the rewrap, the codec's cost, and the result."""
