"""Float64 NumPy references of every update rule riemax implements.

Each module is written from the specification, step by step and in its order of
operations, and shares no code with riemax; the parity tests run riemax and the
reference side by side.

* :mod:`reference.grassmann`: the sphere primitives, SGD-G and Adam-G, and the
  Euclidean companion of their hybrid;
* :mod:`reference.srt`: AdamS/AdamSRT and SGD-MRT on channel groups;
* :mod:`reference.adamp`: SGDP and AdamP;
* :mod:`reference.nero`: Nero;
* :mod:`reference.rotational`: the rotational wrapper, its inner optimizers and
  equilibrium rates;
* :mod:`reference.cayley`: Cayley SGD and Cayley Adam on the Stiefel manifold;
* :mod:`reference.enorm`: one ENorm cycle;
* :mod:`reference.muon`: the Polar Express matrix sign, manifold Muon (dual
  ascent with early stop) and hyperspherical descent.
"""
