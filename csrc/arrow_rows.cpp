// Samples straight from the buffers of an Arrow record batch (scalselect_fast/data/arrow.py).
//
// The Python side hands over, per batch, the Arrow buffers of the columns a sample needs (validity
// bitmaps, offsets, UTF-8 values, image bytes; every read is checked against the buffer sizes), and
// rows [start, stop) are built per call. A row becomes a Sample here when it is *plain*:
//
//   * id: non-empty, no line break;
//   * every turn's role spelling is a key of the alias table as it is (no case folding);
//   * every image has bytes; it is named by its struct path, else "<where>#<local>/image<j>";
//   * placeholders: as many `token`s in the texts as images, or none, when `token + "\n"` per
//     image is put before the first user turn's text.
//
// A row that is not plain is left to the record path (scalselect_fast/data/readers.py
// parse_record), which decides whether it is a sample or a skip and why: this code never rejects.
// The tests check both paths give identical samples on rows that hit every branch.
#include "arrow_rows.h"

#include <structmember.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ssf {

namespace {

// An owned reference, released on scope exit unless taken.
struct Ref {
    PyObject* p = nullptr;
    explicit Ref(PyObject* o = nullptr) : p(o) {}
    Ref(const Ref&) = delete;
    Ref& operator=(const Ref&) = delete;
    ~Ref() { Py_XDECREF(p); }
    PyObject* take() {
        PyObject* o = p;
        p = nullptr;
        return o;
    }
};

PyObject* check(PyObject* o) {
    if (o == nullptr) {
        throw py::error_already_set();
    }
    return o;
}

Py_ssize_t slot_of(PyTypeObject* type, py::handle descr) {
    if (!PyObject_TypeCheck(descr.ptr(), &PyMemberDescr_Type)) {
        throw py::type_error("expected a __slots__ member descriptor");
    }
    auto* md = reinterpret_cast<PyMemberDescrObject*>(descr.ptr());
    const PyMemberDef* def = md->d_member;
    if (!PyType_IsSubtype(type, md->d_common.d_type) || def->type != T_OBJECT_EX || (def->flags & READONLY) ||
        def->offset < 0 || static_cast<Py_ssize_t>(def->offset + sizeof(PyObject*)) > type->tp_basicsize) {
        throw py::type_error("member descriptor is not a writable object slot of the class");
    }
    return def->offset;
}

PyTypeObject* slots_class(py::handle cls) {
    if (!PyType_Check(cls.ptr())) {
        throw py::type_error("expected a class");
    }
    auto* type = reinterpret_cast<PyTypeObject*>(cls.ptr());
    if (type->tp_alloc == nullptr || type->tp_dictoffset != 0) {
        throw py::type_error("expected a __slots__ class without a __dict__");
    }
    return type;
}

// Stores a new reference in an object's slot.
inline void put(PyObject* obj, Py_ssize_t off, PyObject* v) { *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + off) = v; }

// Views of Arrow arrays from their buffers, as the Python side hands them over (see native.py).
// Every view checks, once, that what the rows will read lies inside its buffers.
struct Buf {
    py::buffer_info info;
    const std::uint8_t* p = nullptr;
    std::int64_t size = 0;
    Buf() = default;
    explicit Buf(py::handle h) {
        if (h.is_none()) {
            return;
        }
        info = py::reinterpret_borrow<py::buffer>(h).request();
        p = static_cast<const std::uint8_t*>(info.ptr);
        size = static_cast<std::int64_t>(info.size * info.itemsize);
    }
};

// A validity bitmap (none: all valid).
struct Bits {
    Buf b;
    std::int64_t off = 0;
    void init(py::handle buf, std::int64_t offset, std::int64_t n, const char* what) {
        b = Buf(buf);
        off = offset;
        if (b.p != nullptr && (off + n + 7) / 8 > b.size) {
            throw py::value_error(std::string(what) + ": validity bitmap too short");
        }
    }
    bool valid(std::int64_t i) const { return b.p == nullptr || ((b.p[(off + i) >> 3] >> ((off + i) & 7)) & 1); }
};

// int32 or int64 offsets, from element `off` on.
struct Offsets {
    Buf b;
    std::int64_t off = 0, lim = 0;
    bool large = false;
    const char* name = "";
    void init(py::handle buf, std::int64_t offset, std::int64_t n, bool is_large, std::int64_t limit,
              const char* what) {
        b = Buf(buf);
        off = offset;
        large = is_large;
        const std::int64_t width = large ? 8 : 4;
        if (n == 0 && b.p == nullptr) {
            return;
        }
        if (b.p == nullptr || off < 0 || (off + n + 1) * width > b.size) {
            throw py::value_error(std::string(what) + ": offsets buffer too short");
        }
        lim = limit;
        name = what;
    }
    // Element i's [begin, end) in the values, checked to lie inside them.
    inline void range(std::int64_t i, std::int64_t& begin, std::int64_t& end) const {
        begin = at(i);
        end = at(i + 1);
        if (__builtin_expect(begin < 0 || begin > end || end > lim, 0)) {
            outside();
        }
    }
    [[noreturn]] __attribute__((noinline)) void outside() const {
        throw py::value_error(std::string(name) + ": offsets point outside the values");
    }
    std::int64_t at(std::int64_t i) const {
        return large ? reinterpret_cast<const std::int64_t*>(b.p)[off + i]
                     : static_cast<std::int64_t>(reinterpret_cast<const std::int32_t*>(b.p)[off + i]);
    }
};

// A string or binary array: (validity, offsets, data, offset, length, large).
struct Strings {
    Bits valid;
    Offsets offs;
    Buf data;
    std::int64_t n = 0;
    Strings() = default;
    Strings(py::handle spec, const char* what) {
        auto t = py::reinterpret_borrow<py::tuple>(spec);
        if (t.size() != 6) {
            throw py::value_error(std::string(what) + ": expected (validity, offsets, data, offset, length, large)");
        }
        const std::int64_t offset = t[3].cast<std::int64_t>();
        n = t[4].cast<std::int64_t>();
        data = Buf(t[2]);
        valid.init(t[0], offset, n, what);
        offs.init(t[1], offset, n, t[5].cast<bool>(), data.size, what);
    }
    bool null(std::int64_t i) const { return !valid.valid(i); }
    // Element i's bytes (checked against the buffers).
    std::pair<const char*, Py_ssize_t> get(std::int64_t i) const {
        std::int64_t a, b;
        offs.range(i, a, b);
        return {reinterpret_cast<const char*>(data.p) + a, static_cast<Py_ssize_t>(b - a)};
    }
    PyObject* str(std::int64_t i) const {
        auto v = get(i);
        return check(PyUnicode_DecodeUTF8(v.first, v.second, "strict"));
    }
};

// A list array: (validity, offsets, offset, length, large); its items are another view's elements.
struct Lists {
    Bits valid;
    Offsets offs;
    std::int64_t n = 0;
    Lists() = default;
    Lists(py::handle spec, std::int64_t items, const char* what) {
        auto t = py::reinterpret_borrow<py::tuple>(spec);
        if (t.size() != 5) {
            throw py::value_error(std::string(what) + ": expected (validity, offsets, offset, length, large)");
        }
        const std::int64_t offset = t[2].cast<std::int64_t>();
        n = t[3].cast<std::int64_t>();
        valid.init(t[0], offset, n, what);
        offs.init(t[1], offset, n, t[4].cast<bool>(), items, what);
    }
};

// A validity bitmap alone: (validity, offset, length).
Bits bits_of(py::handle spec, std::int64_t expect, const char* what) {
    auto t = py::reinterpret_borrow<py::tuple>(spec);
    if (t.size() != 3 || t[2].cast<std::int64_t>() != expect) {
        throw py::value_error(std::string(what) + ": expected (validity, offset, length) of the right length");
    }
    Bits b;
    b.init(t[0], t[1].cast<std::int64_t>(), expect, what);
    return b;
}

// Appends v (>= 0) in decimal (snprintf's format parsing was 2% of a read).
void append_int(std::string& out, Py_ssize_t v) {
    char digits[24];
    int k = 0;
    do {
        digits[k++] = static_cast<char>('0' + v % 10);
        v /= 10;
    } while (v > 0 && k < 24);
    while (k > 0) {
        out.push_back(digits[--k]);
    }
}

Py_ssize_t count_token(const char* s, Py_ssize_t len, const std::string& token) {
    // UTF-8 is self-synchronising and the token is ASCII, so counting in the bytes is str.count.
    // memchr for the first byte, then a compare: glibc's memmem set-up cost more on short texts.
    Py_ssize_t count = 0;
    const Py_ssize_t k = static_cast<Py_ssize_t>(token.size());
    const char first = token[0];
    const char* end = s + len;
    while (end - s >= k) {
        const char* hit = static_cast<const char*>(std::memchr(s, first, static_cast<size_t>(end - s - k + 1)));
        if (hit == nullptr) {
            break;
        }
        if (std::memcmp(hit, token.data(), static_cast<size_t>(k)) == 0) {
            ++count;
            s = hit + k;
        } else {
            s = hit + 1;
        }
    }
    return count;
}

// Role spellings seen so far -> the alias table's value (a borrowed reference, or null: unknown).
struct RoleCache {
    PyObject* aliases;
    std::vector<std::pair<std::string, PyObject*>> seen;
    Ref keep;  // a list holding the values, so the borrowed pointers stay valid

    explicit RoleCache(PyObject* a) : aliases(a), keep(check(PyList_New(0))) {}
    PyObject* get(const char* s, Py_ssize_t len) {
        for (const auto& e : seen) {
            if (static_cast<Py_ssize_t>(e.first.size()) == len && std::memcmp(e.first.data(), s, len) == 0) {
                return e.second;
            }
        }
        Ref key(check(PyUnicode_DecodeUTF8(s, len, "strict")));
        PyObject* v = PyDict_GetItemWithError(aliases, key.p);
        if (v == nullptr && PyErr_Occurred()) {
            throw py::error_already_set();
        }
        if (v != nullptr && PyList_Append(keep.p, v) < 0) {
            throw py::error_already_set();
        }
        if (seen.size() < 64) {
            seen.emplace_back(std::string(s, static_cast<size_t>(len)), v);
        }
        return v;
    }
};

}  // namespace

py::tuple arrow_samples(py::dict spec, Py_ssize_t start, Py_ssize_t stop) {
    const Py_ssize_t n = spec["n"].cast<Py_ssize_t>();
    if (start < 0 || start > stop || stop > n) {
        throw py::value_error("rows [start, stop) must lie within the batch");
    }
    const Py_ssize_t index0 = spec["index"].cast<Py_ssize_t>();
    const Py_ssize_t local0 = spec["local"].cast<Py_ssize_t>();
    const std::string where = spec["where"].cast<std::string>();
    const std::string token = spec["token"].cast<std::string>();
    if (token.empty() || n < 0) {
        throw py::value_error("token must not be empty and n >= 0");
    }
    PyTypeObject* stype = slots_class(spec["sample_cls"]);
    PyTypeObject* itype = slots_class(spec["image_cls"]);
    auto sslots = py::reinterpret_borrow<py::tuple>(spec["sample_slots"]);  // id images messages source index line raw
    auto islots = py::reinterpret_borrow<py::tuple>(spec["image_slots"]);  // data name
    if (sslots.size() != 7 || islots.size() != 2) {
        throw py::value_error("sample_slots needs 7 descriptors and image_slots 2");
    }
    Py_ssize_t so[7], io[2];
    for (int k = 0; k < 7; ++k) so[k] = slot_of(stype, sslots[k]);
    for (int k = 0; k < 2; ++k) io[k] = slot_of(itype, islots[k]);
    PyObject* raw = spec["raw"].ptr();
    PyObject* aliases = spec["aliases"].ptr();
    if (!PyDict_Check(aliases)) {
        throw py::type_error("aliases must be a dict");
    }
    Ref user(check(PyUnicode_FromString(spec["user"].cast<std::string>().c_str())));
    Ref prefix(check(PyUnicode_FromString((token + "\n").c_str())));
    Ref k_role(check(PyUnicode_InternFromString("role")));
    Ref k_content(check(PyUnicode_InternFromString("content")));

    // ids: a string column, or a list of str / None made in Python (integer ids)
    Strings ids;
    PyObject** id_list = nullptr;
    if (spec.contains("id_list")) {
        PyObject* l = spec["id_list"].ptr();
        if (!PyList_Check(l) || PyList_GET_SIZE(l) != n) {
            throw py::value_error("id_list must be a list of n ids");
        }
        id_list = reinterpret_cast<PyListObject*>(l)->ob_item;
    } else {
        ids = Strings(spec["ids"], "ids");
        if (ids.n != n) throw py::value_error("ids: wrong length");
    }
    // turns: the list column, the turn structs' validity, roles and texts
    Strings roles(spec["roles"], "roles"), texts(spec["texts"], "texts");
    if (texts.n != roles.n) throw py::value_error("roles and texts differ in length");
    Lists turns(spec["turns"], roles.n, "turns");
    if (turns.n != n) throw py::value_error("turns: wrong length");
    Bits turn_valid = bits_of(spec["turn_valid"], roles.n, "turn_valid");
    // images: "struct_list" (a list of {bytes, path} per row), "struct" (one struct) or "bytes"
    const std::string kind = spec.contains("image_kind") ? spec["image_kind"].cast<std::string>() : "";
    if (!kind.empty() && kind != "struct_list" && kind != "struct" && kind != "bytes") {
        throw py::value_error("unknown image_kind");
    }
    Strings img_bytes, img_paths;
    Lists img_rows;
    Bits struct_valid;
    const bool with_images = !kind.empty(), listed = kind == "struct_list", single_struct = kind == "struct";
    bool with_paths = false;
    if (with_images) {
        img_bytes = Strings(spec["image_bytes"], "image_bytes");
        if (kind != "bytes") {
            struct_valid = bits_of(spec["image_valid"], img_bytes.n, "image_valid");
            if (!spec["image_paths"].is_none()) {
                img_paths = Strings(spec["image_paths"], "image_paths");
                with_paths = true;
                if (img_paths.n != img_bytes.n) throw py::value_error("image_paths: wrong length");
            }
        }
        if (listed) {
            img_rows = Lists(spec["image_rows"], img_bytes.n, "image_rows");
            if (img_rows.n != n) throw py::value_error("image_rows: wrong length");
        } else if (img_bytes.n != n) {
            throw py::value_error("image_bytes: wrong length");
        }
    }
    // source: a string column, or a list made in Python
    Strings sources;
    PyObject** source_list = nullptr;
    const bool utf8_source = spec.contains("source") && !spec["source"].is_none();
    if (utf8_source) {
        sources = Strings(spec["source"], "source");
        if (sources.n != n) throw py::value_error("source: wrong length");
    } else if (spec.contains("source_list")) {
        PyObject* l = spec["source_list"].ptr();
        if (!PyList_Check(l) || PyList_GET_SIZE(l) != n) {
            throw py::value_error("source_list must be a list of n values");
        }
        source_list = reinterpret_cast<PyListObject*>(l)->ob_item;
    }

    RoleCache role_cache(aliases);
    py::array_t<std::int64_t> digests(stop - start);
    std::int64_t* dig = digests.mutable_data();
    py::list out = py::reinterpret_steal<py::list>(check(PyList_New(stop - start)));
    py::list others = py::reinterpret_steal<py::list>(check(PyList_New(0)));
    std::vector<PyObject*> turn_roles;
    std::string name_buf = where;  // "<where>" + "#<local>/image<j>" of unnamed images

    for (Py_ssize_t i = start; i < stop; ++i) {
        dig[i - start] = 0;
        // turns: a non-empty list of non-null structs with known role spellings and texts
        std::int64_t t0, t1;
        turns.offs.range(i, t0, t1);
        bool ok = turns.valid.valid(i) && t1 > t0;
        Ref id;
        if (ok) {
            if (id_list != nullptr) {
                PyObject* v = id_list[i];
                ok = PyUnicode_Check(v);
                if (ok) {
                    Py_INCREF(v);
                    id.p = v;
                }
            } else {
                const auto [s, len] = ids.get(i);
                ok = !ids.null(i) && len > 0 && std::memchr(s, '\n', len) == nullptr &&
                     std::memchr(s, '\r', len) == nullptr;
                if (ok) {
                    id.p = ids.str(i);
                }
            }
        }
        Py_ssize_t n_ph = 0;
        if (ok) {
            turn_roles.clear();
            for (std::int64_t t = t0; t < t1 && ok; ++t) {
                ok = turn_valid.valid(t) && !roles.null(t) && !texts.null(t);
                PyObject* r = nullptr;
                if (ok) {
                    const auto [rs, rlen] = roles.get(t);
                    r = role_cache.get(rs, rlen);
                }
                ok = ok && r != nullptr;
                if (ok) {
                    turn_roles.push_back(r);
                    const auto [ts, tlen] = texts.get(t);
                    n_ph += count_token(ts, tlen, token);
                }
            }
        }
        // images: every one with bytes (a null list / struct / value at the row: no images)
        std::int64_t j0 = 0, j1 = 0;
        if (ok && with_images) {
            if (listed) {
                if (img_rows.valid.valid(i)) {
                    img_rows.offs.range(i, j0, j1);
                }
            } else if (single_struct ? struct_valid.valid(i) : !img_bytes.null(i)) {
                j0 = i;
                j1 = i + 1;
            }
            for (std::int64_t j = j0; j < j1 && ok; ++j) {
                ok = (!listed || struct_valid.valid(j)) && !img_bytes.null(j) && img_bytes.get(j).second > 0;
            }
        }
        const Py_ssize_t n_img = static_cast<Py_ssize_t>(j1 - j0);
        // placeholders: as many as images, or none (then before the first user turn)
        Py_ssize_t first_user = -1;
        if (ok && n_ph != n_img) {
            ok = n_ph == 0;
            for (Py_ssize_t t = 0; ok && t < static_cast<Py_ssize_t>(turn_roles.size()); ++t) {
                if (PyUnicode_Compare(turn_roles[t], user.p) == 0) {
                    first_user = t;
                    break;
                }
            }
            ok = ok && first_user >= 0;
        }
        if (!ok) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out.ptr(), i - start, Py_None);
            Ref idx(check(PyLong_FromSsize_t(i)));
            if (PyList_Append(others.ptr(), idx.p) < 0) {
                throw py::error_already_set();
            }
            continue;
        }
        const Py_hash_t h = PyObject_Hash(id.p);
        if (h == -1 && PyErr_Occurred()) {
            throw py::error_already_set();
        }
        dig[i - start] = static_cast<std::int64_t>(h);

        // messages
        const Py_ssize_t nt = static_cast<Py_ssize_t>(t1 - t0);
        Ref messages(check(PyList_New(nt)));
        for (Py_ssize_t t = 0; t < nt; ++t) {
            Ref text(texts.str(t0 + t));
            if (t == first_user) {
                Ref rep(check(PySequence_Repeat(prefix.p, n_img)));
                Ref joined(check(PyUnicode_Concat(rep.p, text.p)));
                std::swap(text.p, joined.p);
            }
            Ref d(check(PyDict_New()));
            if (PyDict_SetItem(d.p, k_role.p, turn_roles[t]) < 0 || PyDict_SetItem(d.p, k_content.p, text.p) < 0) {
                throw py::error_already_set();
            }
            PyList_SET_ITEM(messages.p, t, d.take());
        }
        // images, named by their path, else by their place
        Ref imgs(check(PyList_New(n_img)));
        for (Py_ssize_t j = 0; j < n_img; ++j) {
            const std::int64_t at = j0 + j;
            const auto [bs, blen] = img_bytes.get(at);
            Ref data(check(PyBytes_FromStringAndSize(bs, blen)));
            Ref name;
            if (with_paths && !img_paths.null(at) && img_paths.get(at).second > 0) {
                name.p = img_paths.str(at);
            } else {
                // "<where>#<local>/image<j>", or "record <index>/image<j>" without a file name
                name_buf.resize(where.size());
                name_buf += where.empty() ? "record " : "#";
                append_int(name_buf, where.empty() ? index0 + i : local0 + i);
                name_buf += "/image";
                append_int(name_buf, j);
                name.p = check(PyUnicode_DecodeUTF8(name_buf.data(), static_cast<Py_ssize_t>(name_buf.size()), "strict"));
            }
            PyObject* im = check(itype->tp_alloc(itype, 0));
            put(im, io[0], data.take());
            put(im, io[1], name.take());
            // it holds a bytes and a str only, so it can be in no reference cycle: like CPython's
            // own tuples and dicts of atoms, it need not be tracked by the cycle collector
            if (PyObject_GC_IsTracked(im)) {
                PyObject_GC_UnTrack(im);
            }
            PyList_SET_ITEM(imgs.p, j, im);
        }
        // source: a non-empty string, else None
        Ref source;
        if (utf8_source) {
            if (!sources.null(i) && sources.get(i).second > 0) {
                source.p = sources.str(i);
            }
        } else if (source_list != nullptr) {
            Py_INCREF(source_list[i]);
            source.p = source_list[i];
        }
        if (source.p == nullptr) {
            Py_INCREF(Py_None);
            source.p = Py_None;
        }
        Ref index(check(PyLong_FromSsize_t(index0 + i)));
        PyObject* s = check(stype->tp_alloc(stype, 0));
        put(s, so[0], id.take());
        put(s, so[1], imgs.take());
        put(s, so[2], messages.take());
        put(s, so[3], source.take());
        put(s, so[4], index.take());
        Py_INCREF(Py_None);
        put(s, so[5], Py_None);
        Py_INCREF(raw);
        put(s, so[6], raw);
        PyList_SET_ITEM(out.ptr(), i - start, s);
    }
    return py::make_tuple(out, others, digests);
}

}  // namespace ssf
