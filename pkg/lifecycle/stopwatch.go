package lifecycle

import (
	"time"

	"github.com/containerd/log"
)

// stopwatch times the steps of a create or teardown, for the log: an
// operator (and `make bench`) can see where the time of a view goes.
type stopwatch struct {
	last   time.Time
	fields log.Fields
}

func newStopwatch() *stopwatch {
	return &stopwatch{last: time.Now(), fields: log.Fields{}}
}

// lap records the time since the previous lap as <name>_us.
func (s *stopwatch) lap(name string) {
	now := time.Now()
	s.fields[name+"_us"] = now.Sub(s.last).Microseconds()
	s.last = now
}
