// Command load is the Go load client of `make bench` (bench/compare.py): a
// second opinion on dprouter's numbers from a client that is not Python.
//
//	load --results-fd 5 127.0.0.1:50051
//
// It speaks bench/load.py's protocol: one command a line on stdin,
// {"concurrency": C, "requests": [[prompt token ids, max_tokens], ...]}, run in
// a closed loop (C streams, each sending its next request when the previous
// one ends); one JSON line a run on the results file descriptor, with every
// request's send time and the arrival time and token count of each streamed
// message, in seconds since the process started.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"

	pb "dprouter/v1"
)

type command struct {
	Concurrency int               `json:"concurrency"`
	Raw         []json.RawMessage `json:"requests"`
}

type timing struct {
	Sent     float64   `json:"sent"`
	Arrivals []float64 `json:"arrivals"`
	Tokens   []int     `json:"tokens"`
}

type run struct {
	Concurrency int      `json:"concurrency"`
	WallS       float64  `json:"wall_s"`
	Timings     []timing `json:"timings"`
	Errors      []string `json:"errors"`
}

type request struct {
	prompt    []uint32
	maxTokens int32
}

var start = time.Now()

func now() float64 { return time.Since(start).Seconds() }

func parse(raw json.RawMessage) (request, error) {
	var pair [2]json.RawMessage
	var r request
	if err := json.Unmarshal(raw, &pair); err != nil {
		return r, err
	}
	if err := json.Unmarshal(pair[0], &r.prompt); err != nil {
		return r, err
	}
	return r, json.Unmarshal(pair[1], &r.maxTokens)
}

func send(client pb.GenerateServiceClient, r request) (timing, error) {
	temperature := float32(0)
	t := timing{Sent: now(), Arrivals: []float64{}, Tokens: []int{}}
	stream, err := client.Generate(context.Background(), &pb.GenerateRequest{
		PromptTokenIds: r.prompt,
		Sampling:       &pb.SamplingParams{MaxTokens: &r.maxTokens, Temperature: &temperature, IgnoreEos: true},
	})
	if err != nil {
		return t, err
	}
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			return t, nil
		}
		if err != nil {
			return t, err
		}
		if n := len(response.TokenIds); n > 0 {
			t.Arrivals = append(t.Arrivals, now())
			t.Tokens = append(t.Tokens, n)
		}
	}
}

func closedLoop(client pb.GenerateServiceClient, requests []request, concurrency int) run {
	result := run{Concurrency: concurrency, Timings: []timing{}, Errors: []string{}}
	var mu sync.Mutex
	next := 0
	var wg sync.WaitGroup
	begin := now()
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next == len(requests) {
					mu.Unlock()
					return
				}
				r := requests[next]
				next++
				mu.Unlock()
				t, err := send(client, r)
				mu.Lock()
				if err != nil {
					result.Errors = append(result.Errors, err.Error())
				} else {
					result.Timings = append(result.Timings, t)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	result.WallS = now() - begin
	return result
}

func main() {
	fd := flag.Int("results-fd", 1, "where the results go, one JSON line a run")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: load [--results-fd N] HOST:PORT")
		os.Exit(2)
	}
	results := os.NewFile(uintptr(*fd), "results")
	conn, err := grpc.Dial(flag.Arg(0), grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	client := pb.NewGenerateServiceClient(conn)
	fmt.Fprintln(results, `{"ready": true}`)
	input := bufio.NewReader(os.Stdin)
	for {
		line, err := input.ReadBytes('\n')
		if len(line) == 0 && err != nil {
			return
		}
		var c command
		if err := json.Unmarshal(line, &c); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		requests := make([]request, 0, len(c.Raw))
		for _, raw := range c.Raw {
			r, err := parse(raw)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			requests = append(requests, r)
		}
		out, _ := json.Marshal(closedLoop(client, requests, c.Concurrency))
		results.Write(append(out, '\n'))
	}
}
