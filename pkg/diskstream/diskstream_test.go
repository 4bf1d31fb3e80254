package diskstream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// sparse makes a sparse file of size bytes with data written at offs.
func sparse(t *testing.T, size int64, writes map[int64][]byte) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func random(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed)})
	_, _ = r.Read(b)
	return b
}

func allocated(t *testing.T, f *os.File) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestRoundTrip saves a sparse disk with data at its start, in its middle
// across a block boundary, a long run (several extents), a block of
// written zeroes and a partial last block, and restores it into a new
// file: the bytes are the same, the written zeroes and the holes stay
// holes, and the stream holds no more data than was written.
func TestRoundTrip(t *testing.T) {
	const size = 64<<20 + 1000
	writes := map[int64][]byte{
		0:           random(4096, 1),
		3<<20 - 100: random(300, 2),
		10 << 20:    random(9<<20, 3),
		30 << 20:    make([]byte, 1<<20), // zeroes written: data to SEEK_DATA, left out
		size - 700:  random(700, 4),
	}
	src := sparse(t, size, writes)
	var stream bytes.Buffer
	st, err := Write(&stream, src, size)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size != size || st.Data > 4096+2*block+9<<20+block || st.Data < 4096+300+9<<20+700 || st.Extents < 5 {
		t.Fatalf("stats %+v", st)
	}
	dst := sparse(t, size, nil)
	got, err := Header(&stream, size)
	if err != nil || got != size {
		t.Fatalf("header: %d %v", got, err)
	}
	rst, err := Restore(&stream, dst, size, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rst.Data != st.Data || rst.Extents != st.Extents {
		t.Errorf("restored %+v, written %+v", rst, st)
	}
	a, b := make([]byte, size), make([]byte, size)
	if _, err := src.ReadAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("the restored disk differs")
	}
	if alloc := allocated(t, dst); alloc > st.Data+16*block {
		t.Errorf("the restored disk allocates %d bytes for %d of data: holes were filled", alloc, st.Data)
	}
}

// TestEmptyDisk saves a disk that is all hole: a stream of no extents.
func TestEmptyDisk(t *testing.T) {
	f := sparse(t, 8<<20, nil)
	var stream bytes.Buffer
	st, err := Write(&stream, f, 8<<20)
	if err != nil || st.Extents != 0 || st.Data != 0 || stream.Len() != 32 {
		t.Fatalf("%+v %v, %d bytes", st, err, stream.Len())
	}
}

func record(off, n uint64, data []byte) []byte {
	b := binary.LittleEndian.AppendUint64(nil, off)
	b = binary.LittleEndian.AppendUint64(b, n)
	return append(b, data...)
}

func header(size uint64) []byte {
	return binary.LittleEndian.AppendUint64([]byte(Magic), size)
}

// TestMalformed refuses every malformed stream with ErrFormat, before
// writing what is wrong.
func TestMalformed(t *testing.T) {
	const size = 1 << 20
	x := []byte("abcd")
	for name, s := range map[string][]byte{
		"truncated header": []byte(Magic),
		"bad magic":        append([]byte("SVDISK02"), header(size)[8:]...),
		"zero size":        header(0),
		"too large":        header(size + 1),
		"no end":           append(header(size), record(0, 4, x)...),
		"truncated data":   append(header(size), record(0, 8, x)...),
		"out of order":     append(append(append(header(size), record(100, 4, x)...), record(50, 4, x)...), record(size, 0, nil)...),
		"overlapping":      append(append(append(header(size), record(100, 4, x)...), record(102, 4, x)...), record(size, 0, nil)...),
		"past the end":     append(append(header(size), record(size-2, 4, x)...), record(size, 0, nil)...),
		"offset overflow":  append(append(header(size), record(^uint64(0)-1, 4, x)...), record(size, 0, nil)...),
		"too long":         append(header(size), record(0, MaxExtent+1, nil)...),
		"early end":        append(header(size), record(size-1, 0, nil)...),
		"data after end":   append(append(header(size), record(size, 0, nil)...), 'x'),
	} {
		t.Run(name, func(t *testing.T) {
			f := sparse(t, size, nil)
			r := bytes.NewReader(s)
			n, err := Header(r, size)
			if err == nil {
				_, err = Restore(r, f, n, nil)
			}
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v, want ErrFormat", err)
			}
			if fi, _ := f.Stat(); fi.Size() != size {
				t.Errorf("the file grew to %d", fi.Size())
			}
		})
	}
}

// FuzzRestore feeds Restore any stream: it either fails with ErrFormat or
// writes only inside the disk.
func FuzzRestore(f *testing.F) {
	f.Add(append(append(header(1<<16), record(10, 4, []byte("abcd"))...), record(1<<16, 0, nil)...))
	f.Add(header(1 << 16))
	f.Fuzz(func(t *testing.T, s []byte) {
		const max = 1 << 16
		file := sparse(t, max, nil)
		r := bytes.NewReader(s)
		n, err := Header(r, max)
		if err == nil {
			_, err = Restore(r, file, n, nil)
		}
		if err != nil && !errors.Is(err, ErrFormat) {
			t.Fatalf("error %v does not wrap ErrFormat", err)
		}
		if fi, _ := file.Stat(); fi.Size() != max {
			t.Fatalf("a write outside the disk: the file is %d bytes", fi.Size())
		}
	})
}

// TestRestoreGaps restores onto a disk that holds other data (a block
// device's case): gap zeroes every region no extent covers, so the result
// is the saved disk exactly.
func TestRestoreGaps(t *testing.T) {
	const size = 8 << 20
	src := sparse(t, size, map[int64][]byte{1 << 20: random(5000, 7), 6 << 20: random(1<<20, 8)})
	var stream bytes.Buffer
	if _, err := Write(&stream, src, size); err != nil {
		t.Fatal(err)
	}
	dst := sparse(t, size, map[int64][]byte{0: bytes.Repeat([]byte{0xff}, size)})
	zero := func(off, n int64) error {
		_, err := dst.WriteAt(make([]byte, n), off)
		return err
	}
	if _, err := Header(&stream, size); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(&stream, dst, size, zero); err != nil {
		t.Fatal(err)
	}
	a, b := make([]byte, size), make([]byte, size)
	_, _ = src.ReadAt(a, 0)
	_, _ = dst.ReadAt(b, 0)
	if !bytes.Equal(a, b) {
		t.Fatal("the restored device differs from the saved disk")
	}
}
