// Streams a completion from dprouter, reads the served rank, and checks Health.
//
//   node dist/generate.js 127.0.0.1:50051 "The capital of France is"
//
// The stubs in src/gen are generated from protos/ by `make stubs` (buf with
// protoc-gen-es and protoc-gen-connect-es); Connect speaks plain gRPC here.
import { createPromiseClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { FinishReason, GenerateRequest, SamplingParams } from "./gen/dprouter/v1/generate_pb.js";
import { GenerateService } from "./gen/dprouter/v1/generate_connect.js";
import { HealthCheckResponse_ServingStatus as Status } from "./gen/grpc/health/v1/health_pb.js";
import { Health } from "./gen/grpc/health/v1/health_connect.js";

async function main(address: string, prompt: string): Promise<number> {
  const transport = createGrpcTransport({ baseUrl: `http://${address}`, httpVersion: "2" });
  const generate = createPromiseClient(GenerateService, transport);
  const health = createPromiseClient(Health, transport);

  const request = new GenerateRequest({
    prompt,
    sampling: new SamplingParams({ maxTokens: 8, temperature: 0, ignoreEos: true }),
  });
  let header = new Headers();
  let rank = -1;
  const stream = generate.generate(request, {
    timeoutMs: 60_000,
    onHeader: (h) => (header = h),
  });
  for await (const response of stream) {
    // The first response names the rank; the response headers say it too.
    if (response.dataParallelRank !== undefined) {
      rank = response.dataParallelRank;
      const reason = header.get("x-route-reason");
      console.log(`rank: ${rank} (x-data-parallel-rank: ${header.get("x-data-parallel-rank")}, x-route-reason: ${reason})`);
    }
    process.stdout.write(response.text);
    if (response.usage !== undefined) {
      process.stdout.write(`\nfinish: ${FinishReason[response.finishReason]}, ${response.usage.completionTokens} tokens\n`);
    }
  }

  const overall = await health.check({ service: "" }, { timeoutMs: 10_000 });
  const ofRank = await health.check({ service: `rank/${rank}` }, { timeoutMs: 10_000 });
  console.log(`health: ${Status[overall.status]} (rank/${rank}: ${Status[ofRank.status]})`);
  return overall.status === Status.SERVING ? 0 : 1;
}

const [address = "127.0.0.1:50051", prompt = "The capital of France is"] = process.argv.slice(2);
main(address, prompt).then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
