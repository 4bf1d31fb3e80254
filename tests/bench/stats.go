package main

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// samples are the timings of one scenario, per runtime.
type samples map[string][]time.Duration

func (s samples) add(rt string, d time.Duration) { s[rt] = append(s[rt], d) }

// ratio is snapview's median over runc's.
func (s samples) ratio() float64 {
	return float64(median(s[snapview])) / float64(median(s[runc]))
}

func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return s[i]
}

func median(d []time.Duration) time.Duration { return percentile(d, 50) }

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

// table prints rows under a header, the first column left-aligned.
func table(head []string, rows [][]string) {
	widths := make([]int, len(head))
	for _, r := range append([][]string{head}, rows...) {
		for i, c := range r {
			widths[i] = max(widths[i], len(c))
		}
	}
	line := func(r []string) {
		var b strings.Builder
		for i, c := range r {
			if i == 0 {
				fmt.Fprintf(&b, "  %-*s", widths[i], c)
			} else {
				fmt.Fprintf(&b, "  %*s", widths[i], c)
			}
		}
		fmt.Println(b.String())
	}
	line(head)
	for _, r := range rows {
		line(r)
	}
}

// spread is a ratio's minimum, median and maximum over runs.
func spread(rs []float64) string {
	s := slices.Clone(rs)
	slices.Sort(s)
	return fmt.Sprintf("%.3f / %.3f / %.3f", s[0], s[len(s)/2], s[len(s)-1])
}
