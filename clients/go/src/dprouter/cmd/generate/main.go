// Command generate streams a completion from dprouter, reads the served rank,
// and checks Health.
//
//	generate 127.0.0.1:50051 "The capital of France is"
//
// The stubs in dprouter/v1 are generated from protos/ by `make stubs`
// (protoc-gen-go, protoc-gen-go-grpc). It builds offline in GOPATH mode against
// Debian's Go gRPC packages: GOPATH=<repo>/clients/go:/usr/share/gocode GO111MODULE=off.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	pb "dprouter/v1"
)

func main() {
	address, prompt := "127.0.0.1:50051", "The capital of France is"
	if len(os.Args) > 1 {
		address = os.Args[1]
	}
	if len(os.Args) > 2 {
		prompt = os.Args[2]
	}
	if err := run(address, prompt); err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
}

func run(address, prompt string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// grpc-go 1.33 (Debian's) predates grpc.NewClient and insecure.NewCredentials.
	conn, err := grpc.DialContext(ctx, address, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("cannot reach the router at %s: %w", address, err)
	}
	defer conn.Close()

	maxTokens, temperature := int32(8), float32(0)
	stream, err := pb.NewGenerateServiceClient(conn).Generate(ctx, &pb.GenerateRequest{
		Prompt:   prompt,
		Sampling: &pb.SamplingParams{MaxTokens: &maxTokens, Temperature: &temperature, IgnoreEos: true},
	})
	if err != nil {
		return err
	}
	var header metadata.MD
	rank := int32(-1)
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		// The first response names the rank; the response headers say it too.
		if response.DataParallelRank != nil {
			rank = response.GetDataParallelRank()
			if header, err = stream.Header(); err != nil {
				return err
			}
			fmt.Printf("rank: %d (x-data-parallel-rank: %s, x-route-reason: %s)\n",
				rank, first(header, "x-data-parallel-rank"), first(header, "x-route-reason"))
		}
		fmt.Print(response.Text)
		if usage := response.Usage; usage != nil {
			fmt.Printf("\nfinish: %s, %d tokens\n",
				pb.FinishReason_name[int32(response.FinishReason)][len("FINISH_REASON_"):], usage.CompletionTokens)
		}
	}

	health := healthpb.NewHealthClient(conn)
	overall, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		return err
	}
	ofRank, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: fmt.Sprintf("rank/%d", rank)})
	if err != nil {
		return err
	}
	fmt.Printf("health: %s (rank/%d: %s)\n", overall.Status, rank, ofRank.Status)
	if overall.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("the router is %s", overall.Status)
	}
	return nil
}

func first(md metadata.MD, key string) string {
	if values := md.Get(key); len(values) > 0 {
		return values[0]
	}
	return ""
}
