"""The load-test harness behind ``chargegw loadtest`` (docs/loadtest.md).

- :mod:`.piles`: a generator process holding thousands of light AP3000/BKV piles;
- :mod:`.baseline`: the minimal server the gateway is compared with;
- :mod:`.runner`: servers, generators, probes, /proc samples, the JSON report;
- :mod:`.frames`: the piles' frames, encoded once with chargeproto and patched;
- :mod:`.stats`: histograms, percentiles, process and machine figures;
- :mod:`.cli`: the click command ``loadtest``.
"""
