// Package diskstream saves a disk image as a stream of its data extents
// and writes such a stream back into a file, holes as holes, as bytes only:
// nothing here mounts the disk or reads the filesystem in it (a guest wrote
// it). It is the blob format of snapview's disk snapshots.
//
// The stream (before compression, which is the caller's) is:
//
//	"SVDISK01"                  8 bytes, the format's magic and version
//	size                        uint64, little-endian: the disk's size in bytes
//	extents, in order:          each offset uint64, length uint64, then length bytes
//	end                         offset = size, length = 0
//
// Extents are sorted, do not overlap, lie inside the disk, and are at most
// MaxExtent bytes long; what no extent covers reads as zeroes. Regions of
// the file that are holes (SEEK_HOLE) and runs of zero blocks are left out.
package diskstream

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Magic opens every stream.
const Magic = "SVDISK01"

// MaxExtent is the longest extent a stream may hold.
const MaxExtent = 4 << 20

// block is the granularity at which zero runs inside data are left out.
const block = 64 << 10

// ErrFormat is wrapped by every error about a malformed stream.
var ErrFormat = errors.New("not a snapview disk stream")

// Stats says what a stream holds.
type Stats struct {
	// Size is the disk's size; Data the bytes of its extents (the rest
	// reads as zeroes); Extents how many there are.
	Size, Data int64
	Extents    int
}

// Write writes the disk image f (size bytes long) to w as a stream: its
// data regions, found with SEEK_DATA and SEEK_HOLE, without the blocks of
// them that hold only zeroes. It reads f sequentially, a block at a time.
func Write(w io.Writer, f *os.File, size int64) (Stats, error) {
	st := Stats{Size: size}
	bw := bufio.NewWriterSize(w, 1<<20)
	hdr := make([]byte, 16)
	copy(hdr, Magic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(size))
	if _, err := bw.Write(hdr); err != nil {
		return st, err
	}
	buf := make([]byte, MaxExtent)
	var (
		extOff int64 = -1 // the pending extent's offset, -1: none
		extLen int64
	)
	flush := func() error {
		if extOff < 0 {
			return nil
		}
		rec := make([]byte, 16)
		binary.LittleEndian.PutUint64(rec, uint64(extOff))
		binary.LittleEndian.PutUint64(rec[8:], uint64(extLen))
		if _, err := bw.Write(rec); err != nil {
			return err
		}
		if _, err := bw.Write(buf[:extLen]); err != nil {
			return err
		}
		st.Data += extLen
		st.Extents++
		extOff, extLen = -1, 0
		return nil
	}
	zero, rd := make([]byte, block), make([]byte, block)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole from here on
		}
		if err != nil {
			return st, fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return st, fmt.Errorf("seek hole: %w", err)
		}
		hole = min(hole, size)
		for pos := data; pos < hole; {
			n := min(block-pos%block, hole-pos) // block-aligned reads
			chunk := rd[:n]
			if _, err := f.ReadAt(chunk, pos); err != nil {
				return st, fmt.Errorf("read at %d: %w", pos, err)
			}
			if bytes.Equal(chunk, zero[:n]) {
				if err := flush(); err != nil {
					return st, err
				}
			} else {
				if extOff >= 0 && (extOff+extLen != pos || extLen+n > MaxExtent) {
					if err := flush(); err != nil {
						return st, err
					}
				}
				if extOff < 0 {
					extOff = pos
				}
				copy(buf[extLen:], chunk)
				extLen += n
			}
			pos += n
		}
		if err := flush(); err != nil {
			return st, err
		}
		off = hole
	}
	if err := flush(); err != nil {
		return st, err
	}
	end := make([]byte, 16)
	binary.LittleEndian.PutUint64(end, uint64(size))
	if _, err := bw.Write(end); err != nil {
		return st, err
	}
	return st, bw.Flush()
}

// Header reads a stream's header and returns the disk's size, which must
// be at most maxSize.
func Header(r io.Reader, maxSize int64) (int64, error) {
	hdr := make([]byte, 16)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return 0, fmt.Errorf("%w: its header: %w", ErrFormat, err)
	}
	if string(hdr[:8]) != Magic {
		return 0, fmt.Errorf("%w: magic %q", ErrFormat, hdr[:8])
	}
	size := binary.LittleEndian.Uint64(hdr[8:])
	if size == 0 || size > uint64(maxSize) {
		return 0, fmt.Errorf("%w: a disk of %d bytes (at most %d)", ErrFormat, size, maxSize)
	}
	return int64(size), nil
}

// Restore reads the rest of a stream whose header gave size (Header) and
// writes its extents into f at their offsets. Where no extent lands the
// disk reads as zeroes: gap, when not nil, is called for each such region
// in order (a block device must be zeroed there); with gap nil, f must read
// as zeroes there already (a new file truncated to at least size), so that
// holes stay holes. Every extent is checked before it is written: in order,
// inside the disk, not empty, at most MaxExtent long; the stream must end
// exactly with its end record.
func Restore(r io.Reader, f *os.File, size int64, gap func(off, n int64) error) (Stats, error) {
	st := Stats{Size: size}
	br := bufio.NewReaderSize(r, 1<<20)
	rec := make([]byte, 16)
	buf := make([]byte, MaxExtent)
	next := int64(0)
	for {
		if _, err := io.ReadFull(br, rec); err != nil {
			return st, fmt.Errorf("%w: extent %d: %w", ErrFormat, st.Extents, err)
		}
		off, n := binary.LittleEndian.Uint64(rec), binary.LittleEndian.Uint64(rec[8:])
		if n == 0 {
			if off != uint64(size) {
				return st, fmt.Errorf("%w: it ends at %d, not at the disk's size %d", ErrFormat, off, size)
			}
			if _, err := br.ReadByte(); err != io.EOF {
				return st, fmt.Errorf("%w: data after its end", ErrFormat)
			}
			if gap != nil && next < size {
				if err := gap(next, size-next); err != nil {
					return st, err
				}
			}
			return st, nil
		}
		if off < uint64(next) || n > MaxExtent || off > uint64(size) || n > uint64(size)-off {
			return st, fmt.Errorf("%w: extent %d (%d bytes at %d) is out of order, too long or outside the %d-byte disk", ErrFormat, st.Extents, n, off, size)
		}
		if _, err := io.ReadFull(br, buf[:n]); err != nil {
			return st, fmt.Errorf("%w: extent %d's data: %w", ErrFormat, st.Extents, err)
		}
		if gap != nil && int64(off) > next {
			if err := gap(next, int64(off)-next); err != nil {
				return st, err
			}
		}
		if _, err := f.WriteAt(buf[:n], int64(off)); err != nil {
			return st, err
		}
		next = int64(off + n)
		st.Data += int64(n)
		st.Extents++
	}
}
