// Ogg framing of an Opus stream (RFC 3533 pages, RFC 7845 headers): the browser's WebCodecs
// speak raw Opus packets, Kyutai's protocol speaks Ogg Opus. No dependencies, no build step.
"use strict";

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = (r & 0x80000000) ? ((r << 1) ^ 0x04c11db7) : (r << 1);
    t[i] = r >>> 0;
  }
  return t;
})();

function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc >>> 0;
}

// Writes one packet per page; returns Uint8Array pages.
class OggOpusWriter {
  constructor(sampleRate) {
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.seq = 0;
    this.granule = 0;  // 48 kHz samples
    this.sampleRate = sampleRate;
  }
  headers() {
    const head = new Uint8Array(19);
    const dv = new DataView(head.buffer);
    head.set(new TextEncoder().encode("OpusHead"), 0);
    head[8] = 1; head[9] = 1;                 // version, channels
    dv.setUint16(10, 312, true);               // pre-skip
    dv.setUint32(12, this.sampleRate, true);   // input sample rate
    dv.setInt16(16, 0, true); head[18] = 0;    // gain, mapping family
    const vendor = new TextEncoder().encode("moshax");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    const tv = new DataView(tags.buffer);
    tags.set(new TextEncoder().encode("OpusTags"), 0);
    tv.setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    tv.setUint32(12 + vendor.length, 0, true);
    return concatBytes([this.page(head, 0x02, 0), this.page(tags, 0, 0)]);
  }
  packet(data, samples48k) {
    this.granule += samples48k;
    return this.page(data, 0, this.granule);
  }
  page(data, flags, granule) {
    const lacing = [];
    let n = data.length;
    while (n >= 255) { lacing.push(255); n -= 255; }
    lacing.push(n);
    const page = new Uint8Array(27 + lacing.length + data.length);
    const dv = new DataView(page.buffer);
    page.set([0x4f, 0x67, 0x67, 0x53], 0);  // "OggS"
    page[4] = 0; page[5] = flags;
    dv.setUint32(6, granule % 0x100000000, true);
    dv.setUint32(10, Math.floor(granule / 0x100000000), true);
    dv.setUint32(14, this.serial, true);
    dv.setUint32(18, this.seq++, true);
    dv.setUint32(22, 0, true);
    page[26] = lacing.length;
    page.set(lacing, 27);
    page.set(data, 27 + lacing.length);
    dv.setUint32(22, oggCrc(page), true);
    return page;
  }
}

// Incremental reader: feed() bytes as they come (pages may be split across messages), returns
// the complete Opus audio packets (the OpusHead / OpusTags header packets are skipped).
class OggOpusReader {
  constructor() { this.buf = new Uint8Array(0); this.partial = []; }
  feed(bytes) {
    this.buf = concatBytes([this.buf, bytes]);
    const packets = [];
    for (;;) {
      if (this.buf.length < 27) break;
      if (this.buf[0] !== 0x4f || this.buf[1] !== 0x67 || this.buf[2] !== 0x67 || this.buf[3] !== 0x53) {
        throw new Error("not an Ogg stream");
      }
      const nseg = this.buf[26];
      if (this.buf.length < 27 + nseg) break;
      let size = 0;
      for (let i = 0; i < nseg; i++) size += this.buf[27 + i];
      const end = 27 + nseg + size;
      if (this.buf.length < end) break;
      let off = 27 + nseg;
      for (let i = 0; i < nseg; i++) {
        const l = this.buf[27 + i];
        this.partial.push(this.buf.slice(off, off + l));
        off += l;
        if (l < 255) {
          const p = concatBytes(this.partial);
          this.partial = [];
          const tag = new TextDecoder().decode(p.slice(0, 8));
          if (tag !== "OpusHead" && tag !== "OpusTags") packets.push(p);
        }
      }
      this.buf = this.buf.slice(end);
    }
    return packets;
  }
}

function concatBytes(parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}
