"""The fitted subspace (:class:`Subspace`: mean, scale, V_k, σ, energy, how it was computed), its
file format, and the fit's two errors. It scores rows; it does not fit (see :mod:`.fit`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from .. import native
from ..atomic import atomic_write_bytes
from ..jsonable import to_jsonable

SUBSPACE_FORMAT = "scalselect-subspace"
SUBSPACE_VERSION = 1


class SubspaceError(ValueError):
    """Bad input to the fit (too few rows, zero variance, bad energy/k, ...). Says what to do."""


class InvalidRowsError(SubspaceError):
    """Rows with NaN/inf (or values too large for the compute dtype).

    Attributes
    ----------
    rows : ndarray of int64
        Global indices of the offending rows found (all of them when raised at the end of a pass).
    """

    def __init__(self, message: str, rows: np.ndarray):
        super().__init__(message)
        self.rows = rows


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Subspace:
    """The fitted dominant subspace and everything needed to score a row.

    Attributes
    ----------
    mean : ndarray, shape (d,), float64
        Column mean μ.
    scale : ndarray, shape (d,), float64, or None
        Column standard deviations (population, ddof=0) when ``standardize``; constant columns have
        scale 1 (they are all zero after centring and contribute nothing).
    l2_normalize : bool
        Rows were divided by their L2 norm after centring/scaling.
    components : ndarray, shape (d, k), float64
        V_k: orthonormal right singular vectors as **columns**, by decreasing σ.
    singular_values : ndarray, shape (k,), float64
        σ_1 ≥ … ≥ σ_k of the transformed matrix A.
    energy_curve : ndarray, float64
        All σ² known: d values for the exact solver, the sketch's ℓ Ritz values for randomized.
    k : int
    energy : float or None
        The energy target (None when ``k`` was given).
    captured_energy, total_energy : float
        Σ_{i≤k} σ_i² and ‖A‖_F².
    n, d : int
        Rows used in the fit (invalid rows excluded) and width.
    solver : str
        ``"exact"`` or ``"randomized"``.
    passes : int
        Passes over the data the fit made.
    info : dict
        How it was computed (solver choice and reason, sketch width, timings, invalid rows, ...).
    provenance : dict
        The source's provenance (model, layer, ...).
    """

    mean: np.ndarray
    scale: np.ndarray | None
    l2_normalize: bool
    components: np.ndarray
    singular_values: np.ndarray
    energy_curve: np.ndarray
    k: int
    energy: float | None
    captured_energy: float
    total_energy: float
    n: int
    d: int
    solver: str
    passes: int
    info: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)

    # -------------------------------------------------------------- scoring helpers
    def projection(self) -> np.ndarray:
        """``W = V_k / σ_k``, shape (d, k) float64, so that leverage = ‖pre(x) W‖²."""
        return self.components / self.singular_values[None, :]

    @property
    def inv_scale(self) -> np.ndarray | None:
        return None if self.scale is None else 1.0 / self.scale

    def score(self, X: np.ndarray, bf16: bool = False) -> np.ndarray:
        """Leverage ‖U_k[i]‖² of each row of ``X`` under this subspace.

        Parameters
        ----------
        X : ndarray, shape (m, d), float16 | float32 | float64 (or uint16 bfloat16 bits with bf16)
        bf16 : bool

        Returns
        -------
        ndarray, shape (m,), float64
            Canonical scores (float64 arithmetic rounded to float32, see
            :func:`scalselect_fast.native.leverage_block`). For the rows the subspace was fitted
            on, the scores sum to k.
        """
        X = np.ascontiguousarray(X)
        if X.ndim != 2 or X.shape[1] != self.d:
            raise SubspaceError(f"score(): expected rows of width {self.d}, got shape {X.shape}")
        out = np.empty(X.shape[0], np.float64)
        return native.leverage_block(X, self.mean, self._W(), out, self.inv_scale, self.l2_normalize, bf16)

    def _W(self) -> np.ndarray:
        w = self.__dict__.get("_w_cache")
        if w is None:
            w = np.ascontiguousarray(self.projection())
            self.__dict__["_w_cache"] = w
        return w

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_w_cache", None)
        return state

    # -------------------------------------------------------------- persistence
    def _meta(self) -> dict:
        return {"format": SUBSPACE_FORMAT, "version": SUBSPACE_VERSION, "k": self.k, "energy": self.energy,
                "captured_energy": self.captured_energy, "total_energy": self.total_energy, "n": self.n,
                "d": self.d, "solver": self.solver, "passes": self.passes, "l2_normalize": self.l2_normalize,
                "info": to_jsonable(self.info, "keep"), "provenance": to_jsonable(self.provenance, "keep")}

    def save(self, path) -> Path:
        """Write an ``.npz`` (arrays + a JSON metadata string) atomically; returns the path."""
        path = Path(path)
        arrays = {"mean": self.mean, "components": self.components, "singular_values": self.singular_values,
                  "energy_curve": self.energy_curve, "meta_json": np.array(json.dumps(self._meta()))}
        if self.scale is not None:
            arrays["scale"] = self.scale
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path) -> "Subspace":
        """Read a file written by :meth:`save` (clear error if it is not one)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            # missing, empty, truncated, or a plain .npy (no archive to open)
            raise SubspaceError(f"{path}: cannot read a subspace file ({exc}); pass a file written by "
                                f"`scalselect fit` or Subspace.save") from exc
        if "meta_json" not in arrays:
            raise SubspaceError(f"{path}: not a scalselect subspace file (no metadata)")
        try:
            meta = json.loads(str(arrays["meta_json"]))
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != SUBSPACE_FORMAT:
            raise SubspaceError(f"{path}: not a scalselect subspace file")
        try:
            return cls(mean=arrays["mean"], scale=arrays.get("scale"), l2_normalize=bool(meta["l2_normalize"]),
                       components=arrays["components"], singular_values=arrays["singular_values"],
                       energy_curve=arrays["energy_curve"], k=int(meta["k"]), energy=meta["energy"],
                       captured_energy=float(meta["captured_energy"]), total_energy=float(meta["total_energy"]),
                       n=int(meta["n"]), d=int(meta["d"]), solver=meta["solver"], passes=int(meta["passes"]),
                       info=meta.get("info", {}), provenance=meta.get("provenance", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise SubspaceError(f"{path}: damaged subspace file ({type(exc).__name__}: {exc}); fit it again "
                                f"with `scalselect fit`") from None

    def summary(self) -> str:
        return (f"k={self.k} of d={self.d} capture {self.captured_energy / self.total_energy:.4f} of the "
                f"energy (n={self.n}, solver={self.solver}, passes={self.passes})")
