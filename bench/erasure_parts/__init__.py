"""The parts of the erasure benchmark (`bench/erasure.py` wires them together): the run's sample
data and configuration, the raw floor, the orchestration floor's client, following requests,
where the time goes, and the result as printed and as JSON."""
